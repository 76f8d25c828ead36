"""SalUn (Fan et al., ICLR 2024): random labels on the weights most salient for the forget loss.

The saliency of a weight is ``|gradient of the forget loss|`` accumulated over the forget set;
the top ``ratio`` of all weight elements (SalUn's default threshold keeps half) form an
element-wise :class:`ParameterMask`, then the shared masked update runs with random labels.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.baselines.common import masked_update
from lightning_unlearn.mask import ParameterMask


def saliency_mask(model: nn.Module, forget_loader: DataLoader, ratio: float = 0.5) -> ParameterMask:
    """Element-wise mask of the top ``ratio`` parameters by ``|sum of forget-loss gradients|`` (model in eval mode)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    modes = eval_modes(model)
    try:
        device = next(model.parameters()).device
        for batch in forget_loader:
            x, y = batch[0].to(device), batch[1].to(device).long()
            g = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()), allow_unused=True)
            for n, gi in zip(params, g):
                if gi is not None:
                    grads[n] += gi.detach()
    finally:
        restore_modes(modes)
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    k = max(1, math.ceil(ratio * flat.numel()))
    threshold = torch.topk(flat, k).values[-1]
    return ParameterMask({n: g.abs() >= threshold for n, g in grads.items()})


def salun(model, dm, epochs: int = 1, seed: int = 0, trainer_kwargs=None, ratio: float = 0.5) -> UnlearningResult:
    start = time.perf_counter()
    mask = saliency_mask(model, dm.forget_dataloader(), ratio)
    scoring = time.perf_counter() - start
    return masked_update(model, dm, mask, "random_label", epochs, seed, trainer_kwargs, {"scoring": scoring})
