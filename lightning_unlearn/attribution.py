"""Per-output-channel importance of each Conv/Linear layer for the data to forget.

Every method streams over a dataloader (memory does not grow with the forget set),
scores with the model in eval mode and returns one mean score per output channel.
The methods themselves live in :mod:`lightning_unlearn.scoring` (one class per method,
one registry); this module discovers the layers, streams the data and aggregates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_unlearn.scoring import SCORERS, ChannelScorer, check_method, register_scorer
from lightning_unlearn.scoring.base import out_channels, registry_views

SCORED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Per-channel normalisation fed by a layer: its affine weight/bias follow the layer's selected channels.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


def __getattr__(name: str) -> Any:
    """``SCORING_METHODS`` and ``DEFAULT_MAX_SAMPLES`` follow the registry; ``METHODS`` is their deprecated alias."""
    if name == "METHODS":
        warnings.warn(
            "lightning_unlearn METHODS is deprecated and will be removed in the next release; use SCORING_METHODS",
            DeprecationWarning,
            stacklevel=2,
        )
        name = "SCORING_METHODS"
    views = registry_views()
    if name in views:
        return views[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LayerInfo:
    """A scorable layer: its output channels, the BatchNorm/GroupNorm fed by it, whether it is the model's head."""

    name: str
    out_channels: int
    batchnorm: str | None = None
    is_head: bool = False


class ChannelScores(dict):
    """``{layer name: (out_channels,) mean score}`` plus what aggregation and selection need."""

    def __init__(self, scores: dict[str, Tensor], num_samples: int, method: str, layers: dict[str, LayerInfo]):
        super().__init__(scores)
        self.num_samples, self.method, self.layers = num_samples, method, layers

    def state_dict(self) -> dict:
        return {
            "scores": {k: v.detach().cpu() for k, v in self.items()},
            "num_samples": self.num_samples,
            "method": self.method,
            "layers": {k: vars(v) for k, v in self.layers.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ChannelScores":
        layers = {k: LayerInfo(**v) for k, v in state["layers"].items()}
        return cls(state["scores"], state["num_samples"], state["method"], layers)


def discover_layers(model: nn.Module, example_input: Tensor, layers: Sequence[str] | None = None) -> dict[str, LayerInfo]:
    """Scorable layers in execution order, traced with one forward pass of ``example_input``.

    The head is the last Conv/Linear executed. A BatchNorm belongs to a layer when its input
    is that layer's output tensor (data flow, not module order).
    """
    modules = dict(model.named_modules())
    candidates = {n: m for n, m in modules.items() if isinstance(m, SCORED_TYPES)}
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer to score")
    if layers is not None:
        unknown = [n for n in layers if n not in candidates]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown}; scorable layers are {list(candidates)}")
    order: list[str] = []
    produced: dict[int, str] = {}
    bn_of: dict[str, str] = {}

    def on_layer(name):
        def hook(_, __, out):
            if name not in order:
                order.append(name)
            produced[id(out)] = name
        return hook

    def on_bn(name):
        def hook(_, inputs):
            src = produced.get(id(inputs[0]))
            if src is not None and src not in bn_of:
                bn_of[src] = name
        return hook

    handles = [m.register_forward_hook(on_layer(n)) for n, m in candidates.items()]
    handles += [m.register_forward_pre_hook(on_bn(n)) for n, m in modules.items() if isinstance(m, NORM_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    head = order[-1] if order else None
    chosen = [n for n in order if layers is None or n in layers]
    return {
        n: LayerInfo(n, out_channels(candidates[n]), bn_of.get(n), n == head) for n in chosen
    }


def channel_scores(
    model: nn.Module,
    forget_loader: DataLoader,
    method: str = "grad_x_act",
    layers: Sequence[str] | None = None,
    retain_loader: DataLoader | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    conductance_steps: int = 16,
    progress: bool = False,
) -> ChannelScores:
    """Score every output channel of the Conv/Linear layers for the samples in ``forget_loader``.

    Args:
        method: a registered scoring method (``SCORING_METHODS``): ``"grad_x_act"`` (default),
            ``"ablation"``, ``"gradcam"``, ``"conductance"``, ``"weight_saliency"``, or one added
            with :func:`register_scorer`.
        layers: layer names to score (default: every Conv/Linear layer).
        retain_loader: if given, the score is contrastive: forget score minus retain score.
        max_samples: score a seeded random subsample of at most this many samples
            (default: all, or the method's ``default_max_samples``: 512 for ``ablation`` and ``conductance``).
        conductance_steps: integration steps of ``conductance`` (its ``n_steps`` option).
    """
    scorer_cls = SCORERS[check_method(method)]
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    max_samples = max_samples if max_samples is not None else scorer_cls.default_max_samples
    device = next(model.parameters(), torch.empty(0)).device
    forget_loader = _subsample(forget_loader, max_samples, seed)
    example = _first_inputs(forget_loader).to(device)
    info = discover_layers(model, example[:2], layers)
    modules = dict(model.named_modules())
    scorer = scorer_cls(model, [modules[n] for n in info], n_steps=conductance_steps)
    forget = _mean_scores(scorer, loader=forget_loader, info=info, progress=progress, label="forget")
    if retain_loader is not None:
        retain_loader = _subsample(retain_loader, forget.num_samples, seed + 1)
        retain = _mean_scores(scorer, loader=retain_loader, info=info, progress=progress, label="retain")
        forget = ChannelScores({k: v - retain[k] for k, v in forget.items()}, forget.num_samples, method, info)
    return forget


def _mean_scores(
    scorer: ChannelScorer, loader: Iterable, info: dict[str, LayerInfo], progress: bool, label: str
) -> ChannelScores:
    model = scorer.model
    device = next(model.parameters(), torch.empty(0)).device
    sums: list | None = None
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=f"scoring {label} ({scorer.name})", disable=not progress, leave=False):
            x, y = batch[0].to(device), batch[1].to(device).long()
            if x.shape[0] == 0:
                continue
            per_layer = scorer.score_batch(x, y)
            sums = per_layer if sums is None else _tree_add(sums, per_layer)
            count += x.shape[0]
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError(f"the {label} loader yielded no samples: nothing to score")
    scores = {n: s.float() for n, s in zip(info, scorer.finalize(sums, count))}
    return ChannelScores(scores, count, scorer.name, info)


def _tree_add(a: list, b: list) -> list:
    return [_tree_add(x, y) if isinstance(x, list) else x + y.detach() for x, y in zip(a, b)]


# -- helpers -------------------------------------------------------------------------------
def _first_inputs(loader: Iterable) -> Tensor:
    for batch in loader:
        return batch[0]
    raise ValueError("the forget loader is empty: the forget set has no samples to score")


def _subsample(loader: Iterable, max_samples: int | None, seed: int) -> Iterable:
    """A loader over a seeded random subset of at most ``max_samples`` samples (same batch size).

    A plain iterable of ``(x, y)`` batches (no ``.dataset``) is cut after ``max_samples`` instead.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return loader if max_samples is None else list(_first_samples(loader, max_samples))
    if max_samples is None or len(dataset) <= max_samples:
        return loader
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(dataset), generator=generator)[:max_samples].sort().values.tolist()
    return DataLoader(Subset(dataset, picked), batch_size=loader.batch_size or 64, shuffle=False)


def _first_samples(batches: Iterable, n: int):
    for batch in batches:
        if n <= 0:
            return
        yield (batch[0][:n], batch[1][:n])
        n -= len(batch[1])


__all__ = [
    "DEFAULT_MAX_SAMPLES", "SCORED_TYPES", "SCORERS", "SCORING_METHODS", "ChannelScorer", "ChannelScores", "LayerInfo",
    "channel_scores", "check_method", "discover_layers", "register_scorer",
]
