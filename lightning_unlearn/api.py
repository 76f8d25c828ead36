"""High-level entry points: ``unlearn`` (the method) and ``retrain`` (the exact reference)."""
from __future__ import annotations

import copy
import time
from typing import Any

import lightning.pytorch as pl

from lightning_unlearn._training import fit, reinitialize
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.mask import ParameterMask

__all__ = ["UnlearningResult", "retrain", "result_of", "unlearn"]


def unlearn(
    model: pl.LightningModule,
    datamodule: UnlearningDataModule,
    config: UnlearnConfig | None = None,
    *,
    trainer_kwargs: dict | None = None,
    inplace: bool = False,
    mask: ParameterMask | None = None,
    **overrides: Any,
) -> UnlearningResult:
    """Forget ``datamodule.request``: score channels, select, reset them, repair only the selected slices.

    ``config`` (an :class:`UnlearnConfig`; ``overrides`` replace single fields, e.g.
    ``unlearn(model, dm, ratio=0.2, max_steps=50)``) says how. The input model is left untouched
    unless ``inplace=True``. ``trainer_kwargs`` go to the Lightning ``Trainer`` (accelerator,
    precision, ...); the step budget and the stopping rule are the config's. ``mask``: a precomputed
    selection (e.g. a control such as random channels): no scoring, the same reset and repair.
    ``result.extra`` holds the steps taken, the step budget, why the repair stopped and every check of the
    stopping rule.
    """
    config = UnlearnConfig.build(config, **overrides)
    if trainer_kwargs and ({"max_epochs", "max_steps"} & set(trainer_kwargs)):
        raise ValueError("set the budget with the config's epochs / max_steps, not trainer_kwargs "
                         f"{sorted({'max_epochs', 'max_steps'} & set(trainer_kwargs))}")
    callback = SelectiveUnlearning(config, log_metrics=False, mask=mask)
    work = (model if inplace else copy.deepcopy(model)).train()
    start = time.perf_counter()
    fit(work, datamodule, config.epochs, [callback], trainer_kwargs)
    return result_of(callback, work, datamodule, time.perf_counter() - start)


def result_of(
    callback: SelectiveUnlearning, model: pl.LightningModule, datamodule: UnlearningDataModule, seconds: float
) -> UnlearningResult:
    """The :class:`UnlearningResult` of a fit with ``callback`` (``seconds``: the whole fit): the one place a
    central run's result is assembled (``unlearn`` and ``lightning-unlearn unlearn``)."""
    timings = {**callback.timings, "total": seconds}
    stop_reason = None if callback.stop_reason is None else str(callback.stop_reason)
    extra = {"steps": callback.steps, "step_budget": callback.step_budget, "stop_reason": stop_reason,
             "stopping": callback.stopping_history}
    return UnlearningResult(model, callback.mask, split_accuracies(model, datamodule), timings, callback.scores,
                            extra=extra, config=callback.resolved_config)


def retrain(
    model: pl.LightningModule,
    datamodule: UnlearningDataModule,
    epochs: int,
    trainer_kwargs: dict | None = None,
    seed: int = 0,
) -> UnlearningResult:
    """The exact reference: a fresh copy of ``model`` trained from scratch on the retain data only."""
    fresh = reinitialize(copy.deepcopy(model), seed).train()
    start = time.perf_counter()
    fit(fresh, datamodule, epochs, trainer_kwargs=trainer_kwargs)
    elapsed = time.perf_counter() - start
    return UnlearningResult(fresh, ParameterMask.full(fresh), split_accuracies(fresh, datamodule),
                            {"retrain": elapsed, "total": elapsed}, method="retrain")
