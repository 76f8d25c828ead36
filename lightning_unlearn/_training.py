"""Trainer helpers shared by every layer: a quiet ``Trainer.fit``, re-initialisation, muted Lightning logs."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

QUIET_TRAINER = dict(
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
)


class SeededData(pl.LightningDataModule):
    """One dataset shuffled by its own generator: a client's or a reference model's data order is its seed's."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, generator=gen,
                          num_workers=self.num_workers)


def fit(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    epochs: int | None,
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: dict | None = None,
) -> pl.Trainer:
    """``Trainer.fit`` with quiet defaults that ``trainer_kwargs`` can override.

    ``epochs=None``: no epoch limit; a callback that owns its budget (``SelectiveUnlearning``) stops the fit.
    """
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1 or None, got {epochs!r}")
    kwargs = {**QUIET_TRAINER, "max_epochs": -1 if epochs is None else epochs, **(trainer_kwargs or {})}
    kwargs["callbacks"] = list(kwargs.pop("callbacks", [])) + list(callbacks)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def reinitialize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh weights for every submodule that knows how to reset itself.

    Seeds the global torch RNG (modules draw their initialisation from it): the start of a from-scratch run,
    like ``seed_everything``. Inside a run use :func:`initialised_copy`, which leaves the global RNG alone.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return model


def initialised_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A re-initialised copy of ``model`` (as :func:`reinitialize` with ``seed``); the global RNG state of every
    device is forked and put back, so a reset in the middle of a fit does not re-seed the user's run."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        return reinitialize(copy.deepcopy(model), seed)


@contextlib.contextmanager
def quiet_lightning(level: int = logging.WARNING):
    """Mute Lightning's per-Trainer info lines ("GPU available", ...): a federation builds one Trainer per client."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)
