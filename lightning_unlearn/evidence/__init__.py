"""Evidence of forgetting: accuracy splits, membership inference (population attacks, and
per-example attacks with cached reference models plus the NeurIPS'23 challenge score), backdoor
verification, representation probe, retrain gap and relearn time, the JSON report, plots and a
comparison table.
"""
from lightning_unlearn.evidence.attacks import (
    AttackResult,
    attack_evidence,
    challenge_score,
    forget_quality,
    offline_attack,
    per_example_epsilon,
    population_challenge_score,
    tug_of_war,
    ulira_attack,
)
from lightning_unlearn.evidence.backdoor import (
    BackdoorDataset,
    TriggeredTestSet,
    attack_success_rate,
    choose_poison,
    stamp_trigger,
)
from lightning_unlearn.evidence.compare import aggregate, compare, report_row
from lightning_unlearn.evidence.evaluate import (
    BackdoorSpec,
    evaluate_model,
    evaluate_unlearning,
    random_samples_request,
    write_report,
)
from lightning_unlearn.evidence.gap import ACC_GAP_KEYS, GAP_KEYS, avg_gap, check_forget_size, check_same_classes, relearn_time
from lightning_unlearn.evidence.membership import (
    INFORMATIVE_SHADOW_ACC,
    MIAResult,
    loss_attack_auc,
    mia_efficacy,
    sample_outputs,
)
from lightning_unlearn.evidence.plots import plot_channel_scores, plot_mia_histograms, plot_per_class_accuracy
from lightning_unlearn.evidence.references import train_originals, train_references, unlearned_population
from lightning_unlearn.evidence.probe import ProbeResult, penultimate_features, probe_accuracy
from lightning_unlearn.evidence.report import UnlearningReport, library_versions, save_weights, unique_path, weights_sha256
from lightning_unlearn.metrics import ClassAccuracy, accuracy, class_accuracies, split_accuracies

__all__ = [
    "AttackResult",
    "attack_evidence",
    "challenge_score",
    "forget_quality",
    "offline_attack",
    "per_example_epsilon",
    "population_challenge_score",
    "train_originals",
    "train_references",
    "tug_of_war",
    "ulira_attack",
    "unlearned_population",
    "BackdoorDataset",
    "BackdoorSpec",
    "ClassAccuracy",
    "MIAResult",
    "ProbeResult",
    "TriggeredTestSet",
    "UnlearningReport",
    "accuracy",
    "attack_success_rate",
    "avg_gap",
    "choose_poison",
    "class_accuracies",
    "compare",
    "evaluate_model",
    "evaluate_unlearning",
    "loss_attack_auc",
    "mia_efficacy",
    "penultimate_features",
    "plot_channel_scores",
    "plot_mia_histograms",
    "plot_per_class_accuracy",
    "probe_accuracy",
    "random_samples_request",
    "relearn_time",
    "split_accuracies",
    "stamp_trigger",
    "weights_sha256",
]
