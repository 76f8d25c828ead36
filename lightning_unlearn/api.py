"""High-level entry points: ``unlearn`` (the method) and ``retrain`` (the exact reference)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_unlearn.attribution import ChannelScores
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.selection import ParameterMask

QUIET_TRAINER = dict(
    logger=False,
    enable_checkpointing=False,
    enable_model_summary=False,
    enable_progress_bar=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
)


@dataclass
class UnlearningResult:
    """What ``unlearn`` and the baselines return: the model and the evidence."""

    model: pl.LightningModule
    mask: ParameterMask | None
    metrics: dict[str, float | None]
    timings_s: dict[str, float]
    scores: ChannelScores | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def fit(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    epochs: int,
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: dict | None = None,
) -> pl.Trainer:
    """``Trainer.fit`` with quiet defaults that ``trainer_kwargs`` can override."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    kwargs = {**QUIET_TRAINER, "max_epochs": epochs, **(trainer_kwargs or {})}
    kwargs["callbacks"] = list(kwargs.pop("callbacks", [])) + list(callbacks)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer


def unlearn(
    model: pl.LightningModule,
    datamodule: UnlearningDataModule,
    method: str = "grad_x_act",
    ratio: float = 0.1,
    objective: str = "random_label",
    epochs: int = 1,
    trainer_kwargs: dict | None = None,
    inplace: bool = False,
    max_steps: int | None = None,
    **selection: Any,
) -> UnlearningResult:
    """Forget ``datamodule.request``: score channels, select, fine-tune only the selected slices.

    The input model is left untouched unless ``inplace=True``. ``max_steps`` caps the update
    (a fraction of an epoch is often enough on large data). Extra keyword arguments go to
    :class:`~lightning_unlearn.callbacks.SelectiveUnlearning` (``scope``, ``layers``, ``seed``, ...).
    """
    if max_steps is not None:
        trainer_kwargs = {**(trainer_kwargs or {}), "max_steps": max_steps}
    callback = SelectiveUnlearning(method=method, ratio=ratio, objective=objective, log_metrics=False, **selection)
    work = (model if inplace else copy.deepcopy(model)).train()
    start = time.perf_counter()
    fit(work, datamodule, epochs, [callback], trainer_kwargs)
    timings = {**callback.timings, "total": time.perf_counter() - start}
    return UnlearningResult(work, callback.mask, split_accuracies(work, datamodule), timings, callback.scores)


def reinitialize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh weights for every submodule that knows how to reset itself."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return model


def retrain(
    model: pl.LightningModule,
    datamodule: UnlearningDataModule,
    epochs: int,
    trainer_kwargs: dict | None = None,
    seed: int = 0,
) -> UnlearningResult:
    """The exact reference: a fresh copy of ``model`` trained from scratch on the retain data only."""
    fresh = reinitialize(copy.deepcopy(model), seed).train()
    datamodule.combined = False
    start = time.perf_counter()
    fit(fresh, datamodule, epochs, trainer_kwargs=trainer_kwargs)
    elapsed = time.perf_counter() - start
    return UnlearningResult(fresh, ParameterMask.full(fresh), split_accuracies(fresh, datamodule), {"retrain": elapsed, "total": elapsed})
