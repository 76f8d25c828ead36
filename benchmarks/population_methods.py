"""Candidate unlearning procedures for the population harness (issue 22), each a ``Task -> nn.Module`` function.

``default`` is the library's ``unlearn()`` at its defaults; the rest are candidates measured against
retraining (kept short; the winner is ported into the library later). Shared pieces: seeded forget /
retain batch streams, a masked-logit distillation target (DELETE, CVPR 2025: the original's softmax with
the forgotten class's logit removed), parameter masks that keep everything outside them bit-for-bit.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn import unlearn
from population_task import Method, Task


# -- shared pieces ----------------------------------------------------------------------
def _stream(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded shuffled batches of ``dataset``."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=gen, drop_last=False)
    while True:
        for x, y in loader:
            yield x, y.long()


def _norm_eval(model: nn.Module) -> nn.Module:
    """Train mode with every BatchNorm's running statistics fixed (the library's invariant during unlearning)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def forgotten_logit_mask(y: torch.Tensor, num_classes: int, classes: tuple[int, ...]) -> torch.Tensor:
    """Boolean (batch, classes): the logits to remove from the target (the request's classes; else each sample's label)."""
    mask = torch.zeros(len(y), num_classes, dtype=torch.bool)
    if classes:
        mask[:, list(classes)] = True
    else:
        mask[torch.arange(len(y)), y] = True
    return mask


@torch.no_grad()
def masked_target(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                  classes: tuple[int, ...]) -> torch.Tensor:
    """The original's softmax over the classes left after removing the forgotten logits (DELETE's target)."""
    logits = teacher(x).float()
    logits = logits.masked_fill(forgotten_logit_mask(y, num_classes, classes), float("-inf"))
    return logits.softmax(1)


class FrozenOutside:
    """Restores every parameter element outside ``masks`` after each step (exact freeze, whatever the optimizer)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
        self.masks = masks
        self.saved = {} if masks is None else {n: p.detach().clone() for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())

    def trainable(self) -> list[nn.Parameter]:
        if self.masks is None:
            return list(self.params.values())
        return [p for n, p in self.params.items() if n in self.masks and bool(self.masks[n].any())]

    @torch.no_grad()
    def restore(self) -> None:
        if self.masks is None:
            return
        for n, p in self.params.items():
            m = self.masks.get(n)
            if m is None:
                p.copy_(self.saved[n])
            else:
                p.copy_(torch.where(m, p, self.saved[n]))


def distill(task: Task, steps: int = 100, lr: float = 1e-3, batch: int = 32,
            masks: dict[str, torch.Tensor] | None = None, model: nn.Module | None = None) -> nn.Module:
    """Masked-logit distillation: forget samples toward the original's softmax without the forgotten logit,
    retain samples by cross-entropy; Adam, ``batch`` forget + ``batch`` retain per step."""
    model = task.original if model is None else model
    teacher = copy.deepcopy(task.original).eval()
    dm, classes = task.datamodule, tuple(task.datamodule.request.classes)
    forget, retain = _stream(dm.forget_set, batch, task.seed), _stream(dm.retain_set, batch, task.seed + 1)
    torch.manual_seed(task.seed)
    _norm_eval(model)
    frozen = FrozenOutside(model, masks)
    opt = torch.optim.Adam(frozen.trainable(), lr=lr)
    for _ in range(steps):
        (xf, yf), (xr, yr) = next(forget), next(retain)
        target = masked_target(teacher, xf, yf, task.num_classes, classes)
        loss = F.kl_div(F.log_softmax(model(xf), 1), target, reduction="batchmean") + F.cross_entropy(model(xr), yr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        frozen.restore()
    return model.eval()


# -- methods ------------------------------------------------------------------------------
def default(task: Task) -> nn.Module:
    """The library's ``unlearn()`` at its defaults."""
    torch.manual_seed(task.seed)
    return unlearn(task.original, task.datamodule, inplace=True).model.eval()


def distill_whole(task: Task) -> nn.Module:
    """Reference row: DELETE-style masked-logit distillation of the whole model, 100 Adam steps lr 1e-3, 32+32."""
    return distill(task)


CANDIDATES: dict[str, Method] = {
    "default": default,
    "distill_whole": distill_whole,
}
