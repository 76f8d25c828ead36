"""Forget / remaining / test accuracy with torchmetrics (one implementation, reused everywhere).

:class:`ClassAccuracy` keeps per-class correct/total counts as summed metric states, so the
forget / remaining / per-class numbers are exact under DDP (torchmetrics all-reduces the
counts, not the ratios).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.data.batches import eval_batches

if TYPE_CHECKING:
    from lightning_unlearn.data.unlearning import UnlearningDataModule


class ClassAccuracy(Metric):
    """Accuracy per class and on the forgotten vs remaining classes, from one pass.

    ``update(preds, target)`` takes logits ``(N, C)`` or predicted labels ``(N,)``.
    ``compute()`` returns ``{"acc", "forget_acc", "remaining_acc", "per_class"}``; a group
    with no samples gives NaN (``per_class``) or None (the scalars).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, forget_classes: Sequence[int] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        bad = [c for c in forget_classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"forget class(es) {bad} out of range; allowed classes are 0..{num_classes - 1}")
        self.num_classes = num_classes
        forget = torch.zeros(num_classes, dtype=torch.bool)
        forget[list(int(c) for c in forget_classes)] = True
        self.register_buffer("forget_classes", forget, persistent=False)
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.dim() == 2:
            preds = preds.argmax(-1)
        target = target.long()
        hit = (preds == target).long()
        self.correct += torch.bincount(target, weights=hit, minlength=self.num_classes).long()
        self.total += torch.bincount(target, minlength=self.num_classes)

    def compute(self) -> dict:
        def ratio(sel: Tensor) -> float | None:
            n = int(self.total[sel].sum())
            return int(self.correct[sel].sum()) / n if n else None

        per_class = torch.where(self.total > 0, self.correct / self.total.clamp(min=1), torch.nan)
        everything = torch.ones_like(self.forget_classes)
        return {
            "acc": ratio(everything),
            "forget_acc": ratio(self.forget_classes) if bool(self.forget_classes.any()) else None,
            "remaining_acc": ratio(~self.forget_classes),
            "per_class": [float(v) for v in per_class],
        }


@torch.no_grad()
def _run(model: nn.Module, loader: DataLoader, metric: Metric) -> Metric:
    device = next(model.parameters()).device
    metric = metric.to(device)
    modes = eval_modes(model)  # per module: a frozen BatchNorm stays in eval mode
    preds, targets = [], []
    try:
        for batch in eval_batches(loader):
            out = model(batch[0].to(device))
            preds.append(out.argmax(-1) if out.dim() == 2 else out)  # what the metrics count from logits
            targets.append(batch[1].to(device))
    finally:
        restore_modes(modes)
    if preds:  # one update with every prediction: the same counts as one per batch, without its overhead
        metric.update(torch.cat(preds), torch.cat(targets))
    return metric


def run_metric(model: nn.Module, loader: DataLoader, metric: Metric) -> Metric:
    """``metric`` reset, then updated with ``model``'s outputs over ``loader`` (one pass; module modes restored):
    a metric reused for every check of a run is built once."""
    metric.reset()
    return _run(model, loader, metric)


def accuracy(model: nn.Module, loader: DataLoader | None, num_classes: int) -> float | None:
    """Micro accuracy of ``model`` over ``loader`` (None for a missing loader); restores the train/eval mode."""
    if loader is None:
        return None
    # every rank evaluates the whole loader itself: no cross-rank sync (rank 0 alone writes reports under DDP)
    metric = _run(model, loader, MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False))
    return float(metric.compute()) if metric.update_count else None


def class_accuracies(
    model: nn.Module, loader: DataLoader, num_classes: int, forget_classes: Sequence[int] = ()
) -> dict:
    """:class:`ClassAccuracy` of ``model`` over ``loader`` (one pass)."""
    return _run(model, loader, ClassAccuracy(num_classes, forget_classes, sync_on_compute=False)).compute()


def split_accuracies(
    model: nn.Module, dm: "UnlearningDataModule", max_train_samples: int = 5000, per_class: bool = False
) -> dict:
    """All accuracy splits of one model for one request.

    ``forget_acc`` is the forget-class test accuracy for class requests and the accuracy on the
    forgotten training samples otherwise; ``remaining_acc`` is the remaining-class test accuracy
    for class requests and the retain-train accuracy otherwise. Train splits are evaluated on a
    seeded subsample of at most ``max_train_samples``. The test set is read once; with
    ``per_class=True`` its per-class accuracies are added as ``per_class_test_acc`` (None for an absent class).
    """
    c = dm.num_classes
    test = class_accuracies(model, dm.full_test_dataloader(), c, dm.request.classes)
    out = {
        "forget_train_acc": accuracy(model, _capped(dm.forget_dataloader(), max_train_samples), c),
        "retain_train_acc": accuracy(model, _capped(dm.retain_dataloader(), max_train_samples), c),
        "forget_test_acc": test["forget_acc"],
        "remaining_test_acc": test["remaining_acc"],
        "test_acc": test["acc"],
    }
    is_class = dm.request.kind == "class"
    out["forget_acc"] = out["forget_test_acc"] if is_class else out["forget_train_acc"]
    out["remaining_acc"] = out["remaining_test_acc"] if is_class else out["retain_train_acc"]
    if per_class:
        out["per_class_test_acc"] = [None if v != v else v for v in test["per_class"]]
    return out


def _capped(loader: DataLoader, n: int) -> DataLoader:
    if len(loader.dataset) <= n:
        return loader
    picked = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return DataLoader(Subset(loader.dataset, picked), batch_size=loader.batch_size or 256)
