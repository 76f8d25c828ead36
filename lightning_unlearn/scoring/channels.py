"""Per-output-channel importance of each Conv/Linear layer for the data to forget.

Every method streams over a dataloader (memory does not grow with the forget set),
scores with the model in eval mode and returns one mean score per output channel.
The methods are the scorer classes (one class per method, one registry); this module
streams the data through one and aggregates.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.data.batches import eval_batches
from lightning_unlearn.config import check_method
from lightning_unlearn.scoring.base import SCORERS, ChannelScorer
from lightning_unlearn.scoring.layers import LayerInfo, discover_layers


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




def average_scores(parts: Sequence[tuple[dict[str, Tensor], int]]) -> dict[str, Tensor]:
    """Count-weighted mean of per-part channel scores: the score of the union of the parts' samples.

    ``parts`` are ``(scores, number of samples scored)`` pairs (DDP ranks, federated clients); the sum runs in
    float64 and returns float32, so the result does not depend on how the samples were split.
    """
    total = sum(int(n) for _, n in parts)
    if total <= 0:
        raise ValueError("no samples were scored: nothing to average")
    names = list(parts[0][0])
    return {k: sum((n / total) * s[k].double() for s, n in parts).float() for k in names}


def channel_scores(
    model: nn.Module,
    forget_loader: DataLoader,
    method: str | type[ChannelScorer] | ChannelScorer = "grad_x_act",
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
            with :func:`register_scorer`; or a :class:`ChannelScorer` subclass (registered or not); or a
            scorer instance built on ``model`` (its layers are the ones scored, ``layers`` is then ignored).
        layers: layer names to score (default: every Conv/Linear layer).
        retain_loader: if given, the score is contrastive: forget score minus retain score.
        max_samples: score a seeded random subsample of at most this many samples
            (default: all, or the method's ``default_max_samples``: 512 for ``ablation`` and ``conductance``).
        conductance_steps: integration steps of ``conductance`` (its ``n_steps`` option).
    """
    check_method(method)
    instance = method if isinstance(method, ChannelScorer) else None
    scorer_cls = type(method) if instance is not None else (SCORERS[method] if isinstance(method, str) else method)
    if not (isinstance(scorer_cls, type) and issubclass(scorer_cls, ChannelScorer)):
        raise ValueError(f"method must be a scoring method name, a ChannelScorer subclass or instance, got {method!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    max_samples = max_samples if max_samples is not None else scorer_cls.default_max_samples
    device = next(model.parameters(), torch.empty(0)).device
    forget_loader = _subsample(forget_loader, max_samples, seed)
    example = _first_inputs(forget_loader).to(device)
    modules = dict(model.named_modules())
    if instance is not None:
        if instance.model is not model:
            raise ValueError("the scorer instance was built on another model; build it on the model to score")
        names = {id(m): n for n, m in modules.items()}
        layers = [names[id(m)] for m in instance.layers]
    info = discover_layers(model, example[:2], layers)
    scorer = instance or scorer_cls(model, [modules[n] for n in info], n_steps=conductance_steps)
    order = list(layers) if instance is not None else list(info)
    forget = _mean_scores(scorer, loader=forget_loader, info=info, progress=progress, label="forget", order=order)
    if retain_loader is not None:
        retain_loader = _subsample(retain_loader, forget.num_samples, seed + 1)
        retain = _mean_scores(scorer, loader=retain_loader, info=info, progress=progress, label="retain", order=order)
        forget = ChannelScores({k: v - retain[k] for k, v in forget.items()}, forget.num_samples, scorer.name, info)
    return forget


def _mean_scores(
    scorer: ChannelScorer, loader: Iterable, info: dict[str, LayerInfo], progress: bool, label: str,
    order: Sequence[str],
) -> ChannelScores:
    model = scorer.model
    device = next(model.parameters(), torch.empty(0)).device
    sums: list | None = None
    count = 0
    modes = eval_modes(model)
    try:
        batches = eval_batches(loader)  # the loader's own batches, without per-sample fetching where it can
        for batch in tqdm(batches, desc=f"scoring {label} ({scorer.name})", disable=not progress, leave=False,
                          total=len(loader) if hasattr(loader, "__len__") else None):
            x, y = batch[0].to(device), batch[1].to(device).long()
            if x.shape[0] == 0:
                continue
            per_layer = scorer.score_batch(x, y)
            sums = per_layer if sums is None else _tree_add(sums, per_layer)
            count += x.shape[0]
    finally:
        restore_modes(modes)
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError(f"the {label} loader yielded no samples: nothing to score")
    scores = {n: s.float() for n, s in zip(order, scorer.finalize(sums, count), strict=True)}
    for name, s in scores.items():  # a wrong axis would select other channels than it scored, without a sign
        if tuple(s.shape) != (info[name].out_channels,):
            raise ValueError(f"scorer {scorer.name!r} returned scores of shape {tuple(s.shape)} for layer {name!r}, "
                             f"which has {info[name].out_channels} output channels: one score per channel expected "
                             "(the channel axis is dim 1 of a convolution's output, the last axis of a Linear's)")
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
