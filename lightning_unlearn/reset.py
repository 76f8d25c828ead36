"""Remove before repairing: reset the selected channels, then re-estimate their normalisation statistics.

Fine-tuning the selected channels from their trained values lets a model hide a class behind its
output layer while the features still carry it (it relearns the class in a few steps). Resetting the
selected slices first takes the knowledge out of the weights; the masked update then repairs what the
retain data needs. Every element outside the mask, and every BatchNorm statistic of an unselected
channel, stays bit-for-bit what it was.
"""
from __future__ import annotations

from typing import Callable, Iterable, Union

import torch
from torch import nn

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn._training import initialised_copy
from lightning_unlearn.config import RESETS, check_reset
from lightning_unlearn.mask import BN_TYPES, ParameterMask

#: ``reset="dampen"`` multiplies the selected slices by this factor (SSD-style dampening, not removal).
DAMPEN_FACTOR = 0.1

#: A custom reset: ``(model, mask, generator) -> number of elements changed``; it must change nothing outside ``mask``.
ResetFunction = Callable[[nn.Module, ParameterMask, torch.Generator], int]
Reset = Union[str, ResetFunction]

__all__ = ["DAMPEN_FACTOR", "RESETS", "Reset", "ResetFunction", "reestimate_batchnorm", "reset_selected",
           "selected_batchnorm_channels"]


@torch.no_grad()
def reset_selected(model: nn.Module, mask: ParameterMask, reset: Reset, seed: int = 0) -> int:
    """Reset the elements ``mask`` selects: ``"reinit"`` draws them from the model's own initialisation
    (a re-initialised copy, seeded), ``"dampen"`` scales them by :data:`DAMPEN_FACTOR`, a callable
    ``(model, mask, generator)`` does its own (``generator``: a ``torch.Generator`` seeded with ``seed``).
    Returns how many elements changed hands. The running statistics of the selected BatchNorm channels go
    back to their initial values (mean 0, variance 1) with ``"reinit"``; call :func:`reestimate_batchnorm` next.
    The global torch RNG is left as it was: a reset in the middle of a fit does not re-seed it.
    """
    check_reset(reset)
    if isinstance(reset, str) and reset == "auto":
        raise ValueError("reset 'auto' resolves per request (UnlearnConfig.resolved); allowed here are "
                         "['none', 'reinit', 'dampen'] or a callable")
    if reset == "none":
        return 0
    mask.check(model)
    if callable(reset):
        return int(reset(model, mask, torch.Generator().manual_seed(seed)))
    fresh = dict(initialised_copy(model, seed).named_parameters()) if reset == "reinit" else {}
    count = 0
    for name, p in model.named_parameters():
        keep = mask.masks[name].to(p.device)
        if not bool(keep.any()):
            continue
        new = fresh[name].to(p.device, p.dtype) if reset == "reinit" else p * DAMPEN_FACTOR
        p.copy_(torch.where(keep, new, p))
        count += int(keep.sum())
    if reset == "reinit":
        for bn, selected in _selected_batchnorms(model, mask):
            bn.running_mean[selected] = 0.0
            bn.running_var[selected] = 1.0
    return count


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, mask: ParameterMask, batches: Iterable, max_batches: int = 20) -> int:
    """Running statistics of the selected BatchNorm channels from ``batches`` of retain data (a cumulative
    average over at most ``max_batches``); every other statistic, ``num_batches_tracked`` included, is put
    back exactly. Returns the number of batches used.
    """
    targets = _selected_batchnorms(model, mask)
    if not targets:
        return 0
    every = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.running_mean is not None]
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for m in every}
    device = next(model.parameters()).device
    used = 0
    try:
        modes = eval_modes(model)
        for m in every:
            m.train()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.reset_running_stats()
        for batch in batches:
            if used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            used += 1
    finally:
        for m, (mean, var, tracked, momentum) in saved.items():
            selected = dict(targets).get(m)
            keep = torch.zeros_like(mean, dtype=torch.bool) if selected is None or used == 0 else selected
            m.running_mean.copy_(torch.where(keep, m.running_mean, mean))
            m.running_var.copy_(torch.where(keep, m.running_var, var))
            m.num_batches_tracked.copy_(tracked)
            m.momentum = momentum
        restore_modes(modes)
    return used


def selected_batchnorm_channels(model: nn.Module, mask: ParameterMask) -> dict[str, torch.Tensor]:
    """BatchNorm name -> bool vector of its selected channels, for every BatchNorm with running statistics whose
    weight ``mask`` selects: the statistics a reset leaves to re-estimate."""
    names = {m: n for n, m in model.named_modules()}
    return {names[bn]: selected.cpu() for bn, selected in _selected_batchnorms(model, mask)}


def _selected_batchnorms(model: nn.Module, mask: ParameterMask) -> list[tuple[nn.Module, torch.Tensor]]:
    """(BatchNorm, bool vector of its selected channels) for every BatchNorm whose weight the mask selects."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, BN_TYPES) and module.running_mean is not None:
            key = f"{name}.weight" if name else "weight"
            selected = mask.masks.get(key)
            if selected is not None and bool(selected.any()):
                out.append((module, selected.to(module.running_mean.device)))
    return out
