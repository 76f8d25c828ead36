"""Forget / retain / test splits of a user's data as a LightningDataModule."""
from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.data.validation import checked_targets
from lightning_unlearn.request import ForgetRequest


class UnlearningDataModule(LightningDataModule):
    """Splits training data into forget and retain sets for a :class:`ForgetRequest`.

    ``train_dataloader()`` yields retain batches ``(x, y)``; when a callback of the fit asks for forget
    batches (``SelectiveUnlearning`` with a forget-aware objective: its ``needs_forget_batches``) it yields
    ``{"retain": (x, y), "forget": (x, y)}`` (:meth:`combined_dataloader`) through Lightning's
    ``CombinedLoader``, cycling the smaller forget set. No flag is set on the data module: each fit's
    callbacks say what that fit trains on. :meth:`full_train_dataloader` is every training sample
    (what the original model was trained on).
    ``test_dataloader()`` returns ``[forget_test, remaining_test]`` for class requests
    and ``[test]`` otherwise. Items are ``(input, label, *extra)``; both datasets are checked once,
    here, before any work (:func:`~lightning_unlearn.data.validation.checked_targets`).
    """

    def __init__(
        self,
        train_dataset: Dataset,
        test_dataset: Dataset,
        request: ForgetRequest,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
        forget_indices: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_dataset, self.test_dataset, self.request = train_dataset, test_dataset, request
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        # one pass over all the data before any work: item shape, finite inputs, labels in range
        self.train_targets = checked_targets(train_dataset, "training dataset", num_classes)
        self.test_targets = (self.train_targets if test_dataset is train_dataset
                             else checked_targets(test_dataset, "test dataset", num_classes))
        seen = int(torch.cat([self.train_targets, self.test_targets]).max()) + 1
        self.num_classes = num_classes if num_classes is not None else seen
        if forget_indices is None:
            request.validate(self.train_targets, self.num_classes)
            mask = request.resolve(self.train_targets)
        else:  # resolved elsewhere (a federated client request)
            mask = np.zeros(len(self.train_targets), dtype=bool)
            mask[np.asarray(forget_indices, dtype=np.int64)] = True
        if not mask.any():
            raise ValueError(f"the forget set of {request.to_dict()} is empty")
        if mask.all():
            raise ValueError(f"{request.to_dict()} would forget every training sample: nothing to retain")
        self.forget_indices = np.flatnonzero(mask)
        self.retain_indices = np.flatnonzero(~mask)
        test = self.test_targets.numpy()
        in_forget_classes = np.isin(test, np.asarray(request.classes, dtype=np.int64))
        self.forget_test_indices = np.flatnonzero(in_forget_classes)
        self.remaining_test_indices = np.flatnonzero(~in_forget_classes)

    @classmethod
    def from_datamodule(cls, datamodule: LightningDataModule, request: ForgetRequest, **kwargs) -> "UnlearningDataModule":
        """Wrap an existing LightningDataModule: its train and test datasets are split for ``request``."""
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
        train = datamodule.train_dataloader().dataset
        test = datamodule.test_dataloader()
        test = (test[0] if isinstance(test, (list, tuple)) else test).dataset
        kwargs.setdefault("batch_size", getattr(datamodule, "batch_size", 64))
        return cls(train, test, request, **kwargs)

    # -- datasets -------------------------------------------------------------------
    @property
    def forget_set(self) -> Subset:
        return Subset(self.train_dataset, self.forget_indices.tolist())

    @property
    def retain_set(self) -> Subset:
        return Subset(self.train_dataset, self.retain_indices.tolist())

    # -- loaders --------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, offset: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + offset) if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers
        )

    def train_dataloader(self):
        if self._fit_needs_forget_batches():
            return self.combined_dataloader()
        return self._loader(self.retain_set, shuffle=True)

    def combined_dataloader(self) -> CombinedLoader:
        """``{"retain": (x, y), "forget": (x, y)}`` batches, the smaller forget set cycled."""
        retain = self._loader(self.retain_set, shuffle=True)
        targets = self._fit_forget_targets()
        forget_set = self.forget_set if targets is None else WithTargets(self.forget_set, targets)
        forget = self._loader(forget_set, shuffle=True, offset=1)
        return CombinedLoader({"retain": retain, "forget": forget}, mode="max_size_cycle")

    def full_train_dataloader(self) -> DataLoader:
        """Every training sample, shuffled: what the original model learns from."""
        return self._loader(self.train_dataset, shuffle=True)

    def _fit_needs_forget_batches(self) -> bool:
        trainer = self.trainer
        return trainer is not None and any(getattr(cb, "needs_forget_batches", False) for cb in trainer.callbacks)

    def _fit_forget_targets(self) -> Tensor | None:
        """Per-forget-sample targets a callback of this fit computed (``forget_targets``, in forget-set order):
        the forget batches then carry them as a third element, ``(x, y, target)``."""
        trainer = self.trainer
        for cb in (trainer.callbacks if trainer is not None else []):
            targets = getattr(cb, "forget_targets", None)
            if targets is not None:
                if len(targets) != len(self.forget_indices):
                    raise ValueError(f"{type(cb).__name__}.forget_targets has {len(targets)} rows for "
                                     f"{len(self.forget_indices)} forget samples")
                return targets
        return None

    def retain_dataloader(self, shuffle: bool = False) -> DataLoader:
        return self._loader(self.retain_set, shuffle=shuffle)

    def forget_dataloader(self, shuffle: bool = False) -> DataLoader:
        return self._loader(self.forget_set, shuffle=shuffle, offset=1)

    def forget_test_dataloader(self) -> DataLoader | None:
        """Test samples of the forgotten classes (class requests only, else None)."""
        if not len(self.forget_test_indices):
            return None
        return self._loader(Subset(self.test_dataset, self.forget_test_indices.tolist()), shuffle=False)

    def remaining_test_dataloader(self) -> DataLoader:
        return self._loader(Subset(self.test_dataset, self.remaining_test_indices.tolist()), shuffle=False)

    def full_test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def test_dataloader(self):
        forget = self.forget_test_dataloader()
        return [forget, self.remaining_test_dataloader()] if forget is not None else [self.full_test_dataloader()]


class WithTargets(Dataset):
    """``dataset``'s ``(x, y)`` items with a per-item target appended: ``(x, y, targets[i])``."""

    def __init__(self, dataset: Dataset, targets: Tensor) -> None:
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return item[0], item[1], self.targets[i]
