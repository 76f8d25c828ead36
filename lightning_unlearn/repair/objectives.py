"""Unlearning losses on the forget batch (the retain part is the user's own training_step)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_unlearn.config import FORGET_AWARE, OBJECTIVES

__all__ = ["FORGET_AWARE", "OBJECTIVES", "capped_ascent_loss", "random_label_loss", "random_other_labels"]


def random_other_labels(
    y: Tensor, num_classes: int, forget_classes: Sequence[int] = (), generator: torch.Generator | None = None
) -> Tensor:
    """A random label for each sample, never its own and never a forgotten class (SalUn-style)."""
    excluded = set(int(c) for c in forget_classes)
    allowed = torch.tensor([c for c in range(num_classes) if c not in excluded], device=y.device)
    if excluded and len(allowed):
        pick = torch.randint(len(allowed), y.shape, generator=generator, device="cpu").to(y.device)
        return allowed[pick]
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device="cpu").to(y.device)
    return (y + shift) % num_classes


def random_label_loss(logits: Tensor, y: Tensor, forget_classes: Sequence[int] = (), generator=None) -> Tensor:
    """Cross-entropy towards random wrong labels: the model unlearns the true ones."""
    return F.cross_entropy(logits, random_other_labels(y, logits.shape[-1], forget_classes, generator))


def capped_ascent_loss(logits: Tensor, y: Tensor, cap: float | None = None) -> Tensor:
    """Negative cross-entropy, each sample's CE clamped at ``cap`` (default ``2 ln C``).

    A sample whose loss is already above the cap contributes no gradient, so ascent stops
    pushing once it is forgotten and cannot diverge.
    """
    cap = 2 * math.log(logits.shape[-1]) if cap is None else cap
    ce = F.cross_entropy(logits, y, reduction="none")
    return -torch.clamp(ce, max=cap).mean()
