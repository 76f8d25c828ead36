"""DivergenceGuard: stop a fit at its first non-finite training loss, before the weights turn non-finite.

Why a repair can diverge at the user's own learning rate: with BatchNorm in eval mode (``bn_stats="frozen"``) the
network is no longer invariant to the scale of the weights before each BatchNorm, so a rate tuned for training with
batch statistics can be far too large for the repair. The guard only reads the loss the fit computes anyway: a
healthy fit is unchanged, bit for bit.
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class DivergenceError(RuntimeError):
    """The training loss is non-finite at optimizer step ``step`` (``first``: before any step, where a smaller
    learning rate cannot help). ``message`` replaces the default line."""

    def __init__(self, step: int, loss: float, message: str | None = None) -> None:
        self.step, self.loss, self.first = step, loss, step == 0
        where = "before any optimizer step" if self.first else f"at step {step}"
        super().__init__(message or f"the training loss is {loss} {where}")


class DivergenceGuard(Callback):
    """Raise :class:`DivergenceError` before the backward pass of a batch whose loss is NaN or infinite."""

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergenceError(trainer.global_step, value)
