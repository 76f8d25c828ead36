"""Centralised unlearning baselines behind one interface with the core method.

Every entry of :data:`BASELINES` is ``fn(model, dm, epochs=..., seed=..., trainer_kwargs=..., **params)
-> UnlearningResult`` and leaves ``model`` untouched. ``retrain`` is the exact reference
(:func:`lightning_unlearn.retrain`); ``selective`` is :func:`lightning_unlearn.unlearn` (explanation-selected
channels; the benchmarks' "ours").
"""
from __future__ import annotations

from typing import Any, Callable

from lightning_unlearn.api import retrain, unlearn
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.baselines.common import masked_update
from lightning_unlearn.baselines.controls import output_row, random_channels
from lightning_unlearn.baselines.salun import salun
from lightning_unlearn.baselines.ssd import ssd
from lightning_unlearn.mask import ParameterMask


def selective(model, dm, epochs: int = 1, seed: int = 0, trainer_kwargs=None, **settings: Any) -> UnlearningResult:
    """The core method, :func:`lightning_unlearn.unlearn`; ``settings`` are :class:`~lightning_unlearn.UnlearnConfig` fields."""
    return unlearn(model, dm, epochs=epochs, seed=seed, trainer_kwargs=trainer_kwargs, **settings)


def _full(objective: str, doc: str) -> Callable[..., UnlearningResult]:
    def run(model, dm, epochs: int = 1, seed: int = 0, trainer_kwargs=None) -> UnlearningResult:
        return masked_update(model, dm, ParameterMask.full(model), objective, epochs, seed, trainer_kwargs)

    run.__doc__ = doc
    return run


finetune = _full("retain", "Fine-tune all parameters on the retain set (catastrophic forgetting).")
neggrad_plus = _full("ascent", "NegGrad+: retain cross-entropy plus capped gradient ascent on the forget set, all parameters.")
random_label = _full("random_label", "Random labels on the forget set plus retain cross-entropy, all parameters.")

BASELINES: dict[str, Callable[..., UnlearningResult]] = {
    "selective": selective,
    "retrain": retrain,
    "output_row": output_row,
    "random_channels": random_channels,
    "finetune": finetune,
    "neggrad_plus": neggrad_plus,
    "random_label": random_label,
    "salun": salun,
    "ssd": ssd,
}


def run_method(name: str, model, dm, **kwargs: Any) -> UnlearningResult:
    """Run baseline ``name`` (see :data:`BASELINES`) with its keyword parameters."""
    if name not in BASELINES:
        raise ValueError(f"unknown method {name!r}; allowed methods are {list(BASELINES)}")
    return BASELINES[name](model, dm, **kwargs)


__all__ = ["BASELINES", "run_method"]
