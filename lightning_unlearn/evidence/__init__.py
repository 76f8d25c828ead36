"""Evidence of forgetting: accuracy splits against the retrained reference, relearn time, membership
attacks (per-example U-LiRA with cached reference models), the JSON report and a comparison table.

The entry points are listed here; the building blocks (backdoor triggers, population attacks, the
representation probe, plots) are importable from their modules.
"""
from lightning_unlearn.evidence.attacks import attack_evidence, ulira_attack
from lightning_unlearn.evidence.compare import compare
from lightning_unlearn.evidence.evaluate import evaluate_model, evaluate_unlearning, write_report
from lightning_unlearn.evidence.gap import relearn_time
from lightning_unlearn.evidence.report import UnlearningReport

__all__ = [
    "UnlearningReport",
    "attack_evidence",
    "compare",
    "evaluate_model",
    "evaluate_unlearning",
    "relearn_time",
    "ulira_attack",
    "write_report",
]
