"""Deletion requests end to end: data lineage, a request ledger in a real database, verifiable evidence.

``Ledger`` keeps sources, sample identities, model versions, requests, jobs and evidence
(SQLite file or any SQLAlchemy URL); ``RecordLineage`` records lineage during ``fit``;
``run_pending`` serves the pending requests in one unlearning job (``recover`` finalises or abandons
the jobs of processes that died); ``verify`` re-checks the evidence from the ledger alone. The command
line is ``lightning-unlearn requests ...``.
"""
from lightning_unlearn.ledger.lineage import RecordLineage
from lightning_unlearn.ledger.runner import recover, run_pending
from lightning_unlearn.ledger.store import Ledger
from lightning_unlearn.ledger.verify import verify

__all__ = ["Ledger", "RecordLineage", "recover", "run_pending", "verify"]
