"""Unlearning losses on the forget batch (the retain part is the user's own training_step)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.data.batches import eval_batches
from lightning_unlearn.config import FORGET_AWARE, OBJECTIVES, TARGETED

__all__ = ["FORGET_AWARE", "OBJECTIVES", "TARGETED", "capped_ascent_loss", "heldout_loss", "heldout_targets",
           "memorisation_gap", "random_label_loss", "random_other_labels"]


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


# -- the held-out target (sample requests): the forget samples should look unseen, not mislabelled -------------
@torch.no_grad()
def _margins(model: torch.nn.Module, batches: Iterable) -> tuple[Tensor, Tensor, Tensor]:
    """Logits, labels and phi = logit_y - logsumexp(other logits) (float64) of every ``(x, y)`` batch."""
    device = next(model.parameters()).device
    logits, labels = [], []
    for batch in eval_batches(batches):
        logits.append(model(batch[0].to(device)).double().cpu())
        labels.append(batch[1].long().cpu())
    z, y = torch.cat(logits), torch.cat(labels)
    others = z.scatter(1, y[:, None], float("-inf"))
    return z, y, z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(others, 1)


def _subsample(dataset: Dataset, n: int, seed: int, batch_size: int = 256) -> DataLoader:
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return DataLoader(Subset(dataset, idx), batch_size=batch_size)


@torch.no_grad()
def memorisation_gap(model: torch.nn.Module, trained: Dataset, heldout: Dataset, num_classes: int,
                     samples: int = 512, seed: int = 0) -> Tensor:
    """Per class: how much more confident ``model`` is on samples it trained on than on held-out ones (median phi on
    a seeded subsample of ``trained`` minus on ``heldout``, clamped at 0; 0 for a class missing from either)."""
    _, yr, pr = _margins(model, _subsample(trained, samples, seed))
    _, yt, pt = _margins(model, _subsample(heldout, samples, seed + 1))
    gap = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        if (yr == c).any() and (yt == c).any():
            gap[c] = (pr[yr == c].median() - pt[yt == c].median()).clamp(min=0)
    return gap


@torch.no_grad()
def heldout_targets(model: torch.nn.Module, forget: Dataset, gap: Tensor, batch_size: int = 256) -> Tensor:
    """The held-out target of every forget sample, in dataset order: ``model``'s softmax with the true logit
    lowered by its class's memorisation ``gap`` (float32 probabilities, (N, classes))."""
    z, y, _ = _margins(model, DataLoader(forget, batch_size=batch_size))
    return z.scatter_add(1, y[:, None], -gap.double()[y][:, None]).softmax(1).float()


def heldout_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """KL(targets || softmax(logits)), averaged over the batch: the forget samples pulled to their held-out target."""
    return F.kl_div(F.log_softmax(logits.float(), 1), targets.to(logits.device).float(), reduction="batchmean")
