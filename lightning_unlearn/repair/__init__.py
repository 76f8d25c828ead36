"""The repair: objectives (the forget term), the stopping rule, learning-rate groups and the mixin that
lets an unmodified LightningModule train on combined retain/forget batches."""
from lightning_unlearn.repair.calibration import calibrate_head, optimizer_recipe
from lightning_unlearn.repair.learning_rate import LearningRateGroups
from lightning_unlearn.repair.mixin import UnlearningMixin
from lightning_unlearn.repair.objectives import (
    FORGET_AWARE,
    OBJECTIVES,
    TARGETED,
    capped_ascent_loss,
    heldout_loss,
    heldout_targets,
    memorisation_gap,
    random_label_loss,
    random_other_labels,
)
from lightning_unlearn.repair.stopping import CheckSets, NonFiniteError, StopReason, StoppingRule, check_finite

__all__ = [
    "FORGET_AWARE", "OBJECTIVES", "CheckSets", "LearningRateGroups", "NonFiniteError", "StopReason", "StoppingRule", "UnlearningMixin",
    "TARGETED", "calibrate_head", "capped_ascent_loss", "check_finite", "heldout_loss", "heldout_targets",
    "memorisation_gap", "optimizer_recipe", "random_label_loss", "random_other_labels",
]
