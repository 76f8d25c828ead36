"""ScaleLearningRate: :class:`~lightning_unlearn.repair.LearningRateGroups` as a callback for one fit."""
from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_unlearn.repair import LearningRateGroups


class ScaleLearningRate(Callback):
    """Multiply every optimizer's learning rate by ``factor`` for this fit; ``params`` by their own factor.

    Applied at fit start, before Lightning restores an optimizer from a checkpoint, and kept in the
    checkpoint: a resumed fit has the same groups and the checkpoint's rates (not scaled twice).
    """

    def __init__(self, factor: float = 1.0, params: Mapping[str, float] | None = None) -> None:
        self.groups = LearningRateGroups(factor, params)

    @property
    def is_identity(self) -> bool:
        return self.groups.is_identity

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.groups.apply(pl_module, trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("groups"):
            self.groups = LearningRateGroups.from_state_dict(state_dict["groups"])
