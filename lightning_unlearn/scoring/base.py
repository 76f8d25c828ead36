"""The scoring-method interface and its registry, the single source of method names.

Laid out like captum's layer methods: one class per method, one interface, layers passed
in, nothing global but the registry. A method scores one batch into per-layer channel sums;
``finalize`` turns the sums over all batches into per-sample means.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, TypeVar

from torch import Tensor, nn

from lightning_unlearn.config import SCORERS


class ChannelScorer(ABC):
    """Scores the output channels of ``layers`` of ``model`` for a batch; subclass and register to add a method.

    Every method gets the same options (``channel_scores`` passes ``n_steps``) and ignores those it
    does not use, so a subclass that overrides ``__init__`` takes ``**options`` too.
    """

    name: str = ""
    # Perturbation methods cost a forward pass per channel (or per step): they score a seeded subsample by default.
    default_max_samples: int | None = None

    def __init__(self, model: nn.Module, layers: list[nn.Module], **options: Any) -> None:
        self.model, self.layers = model, list(layers)

    @abstractmethod
    def score_batch(self, x: Tensor, y: Tensor) -> list:
        """Per-layer channel sums over the batch (``(C,)`` tensors, or what ``finalize`` expects)."""

    def finalize(self, sums: list, count: int) -> list[Tensor]:
        """Per-layer ``(C,)`` mean score per sample from the sums over ``count`` samples."""
        return [s.double() / count for s in sums]


ScorerType = TypeVar("ScorerType", bound=type[ChannelScorer])


def register_scorer(cls: ScorerType) -> ScorerType:
    """Class decorator: make ``cls`` available as ``channel_scores(..., method=cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, ChannelScorer)):
        raise ValueError(f"register_scorer expects a ChannelScorer subclass, got {cls!r}")
    if not cls.name or cls.name in SCORERS:
        raise ValueError(f"scorer name {cls.name!r} is empty or taken; registered methods are {list(SCORERS)}")
    SCORERS[cls.name] = cls
    return cls


def registry_views() -> dict[str, Any]:
    """Names derived from the registry, computed on access so a user-registered method shows up too."""
    return {
        "SCORING_METHODS": tuple(SCORERS),
        "DEFAULT_MAX_SAMPLES": {n: c.default_max_samples for n, c in SCORERS.items() if c.default_max_samples is not None},
    }


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def channel_axis(module: nn.Module, ndim: int) -> int:
    """The axis of ``module``'s output channels in an output of ``ndim`` dims: a convolution's is dim 1
    (``(N, C, *spatial)``); a Linear layer's is the last (``(N, C)``, or ``(N, tokens, C)`` in a transformer)."""
    return ndim - 1 if isinstance(module, nn.Linear) else 1


def channels_first(module: nn.Module, t: Tensor) -> Tensor:
    """``module``'s output (or an attribution of its shape) as ``(N, C, *positions)``."""
    return t.movedim(channel_axis(module, t.dim()), 1)
