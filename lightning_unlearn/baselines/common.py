"""Shared pieces of the baselines: a masked update with any objective, and the model's head."""
from __future__ import annotations

import copy
import time
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_unlearn._training import fit
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.scoring import discover_layers
from lightning_unlearn.scoring.layers import LayerInfo, layer_info
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.mask import ParameterMask


def masked_update(
    model: pl.LightningModule,
    dm: UnlearningDataModule,
    mask: ParameterMask,
    objective: str,
    epochs: int = 1,
    seed: int = 0,
    trainer_kwargs: dict | None = None,
    extra_timings: dict[str, float] | None = None,
    **callback: Any,
) -> UnlearningResult:
    """Fine-tune a copy of ``model`` with ``objective`` where ``mask`` allows, everything else frozen exactly.

    Every mask-based baseline is this call with a different mask: the full mask (fine-tune all,
    NegGrad+, random labels), the forgotten classes' output rows, a saliency mask, random channels.
    """
    work = copy.deepcopy(model).train()  # Lightning expects train mode; BatchNorm is frozen by the mask callback
    cb = SelectiveUnlearning(mask=mask, log_metrics=False, objective=objective, seed=seed, epochs=epochs, **callback)
    start = time.perf_counter()
    fit(work, dm, epochs, [cb], trainer_kwargs)
    timings = {**(extra_timings or {}), "unlearning": time.perf_counter() - start}
    timings["total"] = sum(timings.values())
    return UnlearningResult(work, mask, split_accuracies(work, dm), timings, config=cb.resolved_config)


def head_name(layers: dict[str, LayerInfo]) -> str:
    """The classifier head: the last Conv/Linear layer executed."""
    return next(name for name, info in layers.items() if info.is_head)


def forget_rows(dm: UnlearningDataModule, layers: dict[str, LayerInfo]) -> list[int]:
    """Head rows tied to the request: the forgotten classes, or every row for sample/client requests."""
    classes = list(dm.request.classes)
    return classes if classes else list(range(layers[head_name(layers)].out_channels))
