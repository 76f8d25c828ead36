"""GradientMask: train with a ParameterMask so frozen elements stay bit-for-bit unchanged."""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_unlearn.config import check_bn_stats
from lightning_unlearn.mask import MaskEnforcer, ParameterMask


class GradientMask(Callback):
    """Exact parameter masking for any Trainer and optimizer.

    Gradients of frozen elements are zeroed before each step (so clipping sees only trainable
    ones), and after every ``optimizer.step()`` the frozen elements are written back from a
    reference copy: momentum, weight decay and Adam state cannot move them. BatchNorm stays in
    eval mode (``bn_stats="frozen"``). The mask is saved in the checkpoint, so a resumed run
    keeps it.

    Args:
        mask: a :class:`ParameterMask` or a path written by ``ParameterMask.save``.
        bn_stats: ``"frozen"`` or ``"selected"`` (see :class:`~lightning_unlearn.mask.MaskEnforcer`).
    """

    def __init__(self, mask: ParameterMask | str | os.PathLike | None = None, bn_stats: str = "frozen") -> None:
        if mask is not None and not isinstance(mask, (ParameterMask, str, os.PathLike)):
            raise ValueError(f"mask must be a ParameterMask or a path to a saved mask, got {type(mask).__name__}")
        self.mask = ParameterMask.load(mask) if isinstance(mask, (str, os.PathLike)) else mask
        self.bn_stats = check_bn_stats(bn_stats)
        self._enforcer: MaskEnforcer | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mask is None:
            raise ValueError("GradientMask needs a mask: pass GradientMask(mask=...) or use SelectiveUnlearning")
        self._enforcer = MaskEnforcer(pl_module, self.mask, self.bn_stats)
        self._enforcer.attach(trainer.optimizers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._enforcer is not None:
            self._enforcer.freeze_batchnorm()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._enforcer is not None:
            self._enforcer.zero_frozen_grads()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enforcer is not None:
            self._enforcer.restore()
            self._enforcer.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit stopped by an error (Lightning then skips ``teardown``): frozen elements back, hooks off, BatchNorm
        in its own mode again, so a model trained further afterwards is not left with frozen statistics."""
        if self._enforcer is not None:
            self._enforcer.restore()
            self._enforcer.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._enforcer is not None:
            self._enforcer.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mask": None if self.mask is None else self.mask.to_checkpoint(), "bn_stats": self.bn_stats}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mask") is not None:
            self.mask = ParameterMask.from_checkpoint(state_dict["mask"])
        self.bn_stats = state_dict.get("bn_stats", self.bn_stats)
