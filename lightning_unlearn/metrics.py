"""Forget / remaining / test accuracy with torchmetrics (one implementation, reused everywhere)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    from lightning_unlearn.data.unlearning import UnlearningDataModule


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader | None, num_classes: int) -> float | None:
    """Micro accuracy of ``model`` over ``loader`` (None for a missing loader); restores the train/eval mode."""
    if loader is None:
        return None
    device = next(model.parameters()).device
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            metric.update(model(x).argmax(-1), y)
        return float(metric.compute()) if metric.update_count else None
    finally:
        model.train(was_training)


def split_accuracies(model: nn.Module, dm: "UnlearningDataModule", max_train_samples: int = 5000) -> dict:
    """All accuracy splits of one model for one request.

    ``forget_acc`` is the forget-class test accuracy for class requests and the accuracy on the
    forgotten training samples otherwise; ``remaining_acc`` is the remaining-class test accuracy
    for class requests and the retain-train accuracy otherwise. Train splits are evaluated on a
    seeded subsample of at most ``max_train_samples``.
    """
    c = dm.num_classes
    out = {
        "forget_train_acc": accuracy(model, _capped(dm.forget_dataloader(), max_train_samples), c),
        "retain_train_acc": accuracy(model, _capped(dm.retain_dataloader(), max_train_samples), c),
        "forget_test_acc": accuracy(model, dm.forget_test_dataloader(), c),
        "remaining_test_acc": accuracy(model, dm.remaining_test_dataloader(), c),
        "test_acc": accuracy(model, dm.full_test_dataloader(), c),
    }
    is_class = dm.request.kind == "class"
    out["forget_acc"] = out["forget_test_acc"] if is_class else out["forget_train_acc"]
    out["remaining_acc"] = out["remaining_test_acc"] if is_class else out["retain_train_acc"]
    return out


def _capped(loader: DataLoader, n: int) -> DataLoader:
    if len(loader.dataset) <= n:
        return loader
    picked = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return DataLoader(Subset(loader.dataset, picked), batch_size=loader.batch_size or 256)
