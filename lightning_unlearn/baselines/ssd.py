"""SSD, Selective Synaptic Dampening (Foster et al., AAAI 2024): no training, one multiplicative edit.

Importance of a weight = diagonal Fisher, the mean over batches of the squared gradient of
the loss. Weights far more important to the forget set than to the whole training set
(``I_forget > alpha * I_train``) are scaled by ``min(lambda * I_train / I_forget, 1)``.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.evidence.membership import subsample
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.mask import ParameterMask


def fisher_diagonal(model: nn.Module, dataset: Dataset, batch_size: int = 64) -> dict[str, Tensor]:
    """Mean over batches of squared loss gradients per parameter element (model in eval mode)."""
    params = dict(model.named_parameters())
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(model.parameters()).device
    batches = 0
    modes = eval_modes(model)
    try:
        for x, y, *_ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            g = torch.autograd.grad(F.cross_entropy(model(x.to(device)), y.to(device).long()), list(params.values()))
            for n, gi in zip(params, g):
                imp[n] += gi.detach() ** 2
            batches += 1
    finally:
        restore_modes(modes)
    if batches == 0:
        raise ValueError("SSD needs samples to estimate importances; the dataset is empty")
    return {n: v / batches for n, v in imp.items()}


@torch.no_grad()
def dampen(model: nn.Module, imp_train: dict[str, Tensor], imp_forget: dict[str, Tensor], alpha: float, lam: float) -> ParameterMask:
    """Apply SSD in place; returns the mask of the elements that were changed."""
    changed = {}
    for n, p in model.named_parameters():
        selected = imp_forget[n] > alpha * imp_train[n]
        factor = (lam * imp_train[n] / imp_forget[n].clamp_min(1e-30)).clamp(max=1.0)
        p.copy_(torch.where(selected, p * factor, p))
        changed[n] = selected
    return ParameterMask(changed)


def ssd(
    model, dm, epochs: int | None = None, seed: int = 0, trainer_kwargs=None,
    alpha: float = 10.0, lam: float = 1.0, max_samples: int = 5000,
) -> UnlearningResult:
    """``epochs`` and ``trainer_kwargs`` are accepted for the common interface and unused: SSD does not train."""
    if alpha <= 0 or lam <= 0:
        raise ValueError(f"SSD needs alpha > 0 and lam > 0, got alpha={alpha}, lam={lam}")
    work = copy.deepcopy(model)
    start = time.perf_counter()
    imp_train = fisher_diagonal(work, subsample(dm.train_dataset, max_samples, seed), dm.batch_size)
    imp_forget = fisher_diagonal(work, subsample(dm.forget_set, max_samples, seed + 1), dm.batch_size)
    mask = dampen(work, imp_train, imp_forget, alpha, lam)
    elapsed = time.perf_counter() - start
    return UnlearningResult(work, mask, split_accuracies(work, dm), {"unlearning": elapsed, "total": elapsed})
