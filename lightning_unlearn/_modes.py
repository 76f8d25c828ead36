"""Evaluation passes that give every module back its own train/eval mode.

``model.train(was_training)`` after a pass sets *every* submodule to the top module's mode: a part the user keeps in
eval mode on purpose (a frozen backbone's BatchNorm, a pretrained encoder) would silently start updating its
statistics in the next fit. Lightning restores modes per module around validation for the same reason.
"""
from __future__ import annotations

from torch import nn


def eval_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``model`` in eval mode; returns each module's mode before, for :func:`restore_modes`."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    return saved


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    """Give each module the mode :func:`eval_modes` found it in."""
    for module, mode in saved:
        module.training = mode
