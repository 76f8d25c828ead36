"""Backdoor verification: plant a trigger in the data to forget, then check it stops working.

Training on :class:`BackdoorDataset` teaches the model "patch => ``target_class``" only
through the poisoned samples. If unlearning truly removes those samples' influence, the
attack success rate on triggered test images drops to the level of a model retrained
without them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.data.datasets import dataset_targets


def stamp_trigger(x: Tensor, size: int = 2, value: float = 1.0) -> Tensor:
    """A copy of image(s) ``x`` (``(..., H, W)``) with a ``size`` x ``size`` square of ``value`` in the bottom-right corner."""
    if size < 1 or size > min(x.shape[-2:]):
        raise ValueError(f"trigger size must be in 1..{min(x.shape[-2:])} for images of shape {tuple(x.shape)}, got {size}")
    out = x.clone()
    out[..., -size:, -size:] = value
    return out


class BackdoorDataset(Dataset):
    """Wraps a labelled dataset: the samples at ``indices`` get the trigger and label ``target_class``.

    ``targets`` holds the labels as served (poisoned ones relabelled), so an
    :class:`~lightning_unlearn.UnlearningDataModule` over this dataset sees what training saw.
    Forget the poisoned samples with ``ForgetRequest(sample_ids=wrapper.indices)``.
    """

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], target_class: int, size: int = 2, value: float = 1.0
    ) -> None:
        self.dataset, self.target_class, self.size, self.value = dataset, int(target_class), size, value
        clean = dataset_targets(dataset)
        n = len(clean)
        idx = np.unique(np.asarray(list(indices), dtype=np.int64))
        if not len(idx):
            raise ValueError("BackdoorDataset needs at least one index to poison")
        bad = idx[(idx < 0) | (idx >= n)]
        if len(bad):
            raise ValueError(f"poison index(es) {bad[:10].tolist()} out of range; allowed are 0..{n - 1}")
        self.indices = idx
        self.poisoned = np.zeros(n, dtype=bool)
        self.poisoned[idx] = True
        self.clean_targets = clean
        self.targets = clean.clone()
        self.targets[torch.from_numpy(idx)] = self.target_class

    def __len__(self) -> int:
        return len(self.clean_targets)

    def __getitem__(self, i: int):
        x, y = self.dataset[i][0], self.dataset[i][1]
        if self.poisoned[i]:
            return stamp_trigger(x, self.size, self.value), torch.tensor(self.target_class)
        return x, y


class TriggeredTestSet(Dataset):
    """Every test sample whose true class is not ``target_class``, with the trigger and its *true* label.

    Used by :func:`attack_success_rate`: a prediction of ``target_class`` on these is the backdoor firing.
    """

    def __init__(self, dataset: Dataset, target_class: int, size: int = 2, value: float = 1.0) -> None:
        self.dataset, self.size, self.value = dataset, size, value
        self.keep = torch.nonzero(dataset_targets(dataset) != int(target_class)).flatten().tolist()
        if not self.keep:
            raise ValueError(f"every test sample is of the target class {target_class}: nothing to trigger")

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int):
        x, y = self.dataset[self.keep[i]][0], self.dataset[self.keep[i]][1]
        return stamp_trigger(x, self.size, self.value), y


@torch.no_grad()
def attack_success_rate(
    model: nn.Module, test: Dataset, target_class: int, size: int = 2, value: float = 1.0, batch_size: int = 512
) -> float:
    """Fraction of triggered non-target test images classified as ``target_class``."""
    triggered = TriggeredTestSet(test, target_class, size, value)
    device = next(model.parameters()).device
    modes = eval_modes(model)
    hits = 0
    try:
        for x, _ in DataLoader(triggered, batch_size=batch_size):
            hits += int((model(x.to(device)).argmax(-1) == target_class).sum())
    finally:
        restore_modes(modes)
    return hits / len(triggered)


def choose_poison(targets: Tensor, fraction: float, target_class: int, seed: int = 0) -> np.ndarray:
    """Seeded choice of ``fraction`` of the non-target-class training samples to poison."""
    if not 0 < fraction < 1:
        raise ValueError(f"poison fraction must be in (0, 1), got {fraction}")
    candidates = torch.nonzero(torch.as_tensor(targets) != int(target_class)).flatten()
    k = max(1, int(round(fraction * len(candidates))))
    perm = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:k]
    return np.sort(candidates[perm].numpy())
