"""Shared fixtures: digits data and a model trained on it once per session."""
from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.data import load_digits_datasets
from lightning_unlearn.models import SmallCNN


class FullTrainData(pl.LightningDataModule):
    """All training data (the original model is trained on everything)."""

    def __init__(self, dataset, batch_size: int = 64):
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny Lightning fits: one intra-op thread avoids oversubscription on shared CI cores (~10x faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    return load_digits_datasets(seed=0)


@pytest.fixture(scope="session")
def _trained(digits):
    pl.seed_everything(0, verbose=False)
    model = SmallCNN()
    fit(model, FullTrainData(digits[0]), epochs=12)
    return model.eval()


@pytest.fixture
def trained_model(_trained):
    """A fresh copy of a SmallCNN trained on all digits (test accuracy ~0.98)."""
    return copy.deepcopy(_trained)


@pytest.fixture
def class3_dm(digits):
    return UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
