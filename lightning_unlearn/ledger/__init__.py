"""Deletion requests end to end: data lineage, a request ledger in a real database, verifiable evidence.

``Ledger`` keeps sources, sample identities, model versions, requests, jobs and evidence
(SQLite file or any SQLAlchemy URL); ``RecordLineage`` records lineage during ``fit``;
``run_pending`` serves the pending requests in one unlearning job; ``verify`` re-checks the
evidence from the ledger alone. The command line is ``lightning-unlearn requests ...``.
"""
from lightning_unlearn.ledger.identity import demo_subjects, read_subjects, sample_hashes
from lightning_unlearn.ledger.lineage import RecordLineage, record_federated
from lightning_unlearn.ledger.runner import RunOutcome, recover, run_pending
from lightning_unlearn.ledger.store import Job, Ledger, Source
from lightning_unlearn.ledger.verify import Verification, verify

__all__ = [
    "Verification",
    "Job",
    "Ledger",
    "RecordLineage",
    "RunOutcome",
    "Source",
    "demo_subjects",
    "read_subjects",
    "record_federated",
    "recover",
    "run_pending",
    "sample_hashes",
    "verify",
]
