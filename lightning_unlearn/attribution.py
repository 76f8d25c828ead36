"""Per-output-channel importance of each Conv/Linear layer for the data to forget.

Every method streams over a dataloader (memory does not grow with the forget set),
scores with the model in eval mode and returns one mean score per output channel.
Scores are signed so that a positive score means "this channel supports the forget
target (the true-label logit)"; ``"ablation"`` is literally the drop of that logit when
the channel is zeroed, and ``"grad_x_act"`` is its first-order Taylor estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from captum.attr import LayerConductance, LayerFeatureAblation, LayerGradCam, LayerGradientXActivation
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

METHODS = ("grad_x_act", "ablation", "gradcam", "conductance", "weight_saliency")
SCORED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Per-channel normalisation fed by a layer: its affine weight/bias follow the layer's selected channels.
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
# Perturbation methods cost a forward pass per channel (or per step): score a seeded subsample by default.
DEFAULT_MAX_SAMPLES = {"ablation": 512, "conductance": 512}


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
    handles += [m.register_forward_pre_hook(on_bn(n)) for n, m in modules.items() if isinstance(m, _NORM_TYPES)]
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
        n: LayerInfo(n, _out_channels(candidates[n]), bn_of.get(n), n == head) for n in chosen
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
        method: one of ``"grad_x_act"`` (default), ``"ablation"``, ``"gradcam"``, ``"conductance"``,
            ``"weight_saliency"``.
        layers: layer names to score (default: every Conv/Linear layer).
        retain_loader: if given, the score is contrastive: forget score minus retain score.
        max_samples: score a seeded random subsample of at most this many samples
            (default: all, or 512 for the perturbation methods ``ablation`` and ``conductance``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; allowed methods are {list(METHODS)}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    max_samples = max_samples if max_samples is not None else DEFAULT_MAX_SAMPLES.get(method)
    device = next(model.parameters(), torch.empty(0)).device
    forget_loader = _subsample(forget_loader, max_samples, seed)
    example = _first_inputs(forget_loader).to(device)
    info = discover_layers(model, example[:2], layers)
    forget = _mean_scores(model, forget_loader, method, info, conductance_steps, progress, "forget")
    if retain_loader is not None:
        retain_loader = _subsample(retain_loader, forget.num_samples, seed + 1)
        retain = _mean_scores(model, retain_loader, method, info, conductance_steps, progress, "retain")
        forget = ChannelScores({k: v - retain[k] for k, v in forget.items()}, forget.num_samples, method, info)
    return forget


def _mean_scores(model, loader, method, info, steps, progress, label) -> ChannelScores:
    device = next(model.parameters(), torch.empty(0)).device
    modules = dict(model.named_modules())
    layer_modules = [modules[n] for n in info]
    sums: list | None = None
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc=f"scoring {label} ({method})", disable=not progress, leave=False):
            x, y = batch[0].to(device), batch[1].to(device).long()
            if x.shape[0] == 0:
                continue
            per_layer = _SCORERS[method](model, layer_modules, x, y, steps)
            sums = per_layer if sums is None else _tree_add(sums, per_layer)
            count += x.shape[0]
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError(f"the {label} loader yielded no samples: nothing to score")
    if method == "weight_saliency":  # |accumulated gradient| per element, then summed per channel (SalUn)
        sums = [sum(_per_row(g.abs()) for g in grads) for grads in sums]
    scores = {n: (s.double() / count).float() for n, s in zip(info, sums)}
    return ChannelScores(scores, count, method, info)


def _tree_add(a: list, b: list) -> list:
    return [_tree_add(x, y) if isinstance(x, list) else x + y.detach() for x, y in zip(a, b)]


def _per_row(t: Tensor) -> Tensor:
    """Sum of a parameter's elements per output channel (dim 0)."""
    return t.reshape(t.shape[0], -1).sum(1)


# -- one batch -> per-layer channel sums ---------------------------------------------------
def _per_channel(attr: Tensor) -> Tensor:
    """(N, C, *spatial) attributions -> (C,) summed over samples and positions."""
    return attr.detach().reshape(attr.shape[0], attr.shape[1], -1).sum(dim=(0, 2)).double()


def _grad_x_act(model, layers, x, y, steps):
    attrs = LayerGradientXActivation(model, list(layers)).attribute(x, target=y)
    return [_per_channel(a) for a in attrs]


def _gradcam(model, layers, x, y, steps):
    return [
        _per_channel(LayerGradCam(model, layer).attribute(x, target=y, attr_dim_summation=False)) for layer in layers
    ]


def _conductance(model, layers, x, y, steps):
    return [_per_channel(LayerConductance(model, layer).attribute(x, target=y, n_steps=steps)) for layer in layers]


def _weight_saliency(model, layers, x, y, steps):
    """Signed gradient sums of the forget loss per parameter; ``|.|`` is taken after accumulation."""
    params = [[p for p in (layer.weight, layer.bias) if p is not None] for layer in layers]
    flat = [p for ps in params for p in ps]
    flags = [p.requires_grad for p in flat]
    try:
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            grads = iter(torch.autograd.grad(loss, flat))
    finally:
        for p, flag in zip(flat, flags):
            p.requires_grad_(flag)
    return [[next(grads).double() for _ in ps] for ps in params]


def _ablation(model, layers, x, y, steps, max_rows: int = 4096):
    with torch.no_grad():
        original = model(x).gather(1, y[:, None]).squeeze(1)
        return [_ablate_layer(model, layer, x, y, original, max_rows).double() for layer in layers]


def _ablate_layer(model, layer, x, y, original, max_rows) -> Tensor:
    """Drop of the target logit when each output channel of ``layer`` is zeroed, summed over the batch.

    Channels are ablated K at a time in one forward pass: the layer's output is replicated K
    times inside a forward hook, so only the layers after it run on the K-fold batch. A model
    whose tail mixes tensors from before the layer (a residual across it) cannot take that
    batch; it falls back to repeating the input, which recomputes the prefix too.
    """
    n = x.shape[0]
    channels = _out_channels(layer)
    chunk = max(1, max_rows // n)
    total = torch.zeros(channels, device=x.device)
    for start in range(0, channels, chunk):
        k = min(chunk, channels - start)
        keep = torch.ones(k, channels, device=x.device)
        keep[torch.arange(k), torch.arange(start, start + k)] = 0
        logits = _ablated_logits(model, layer, x, keep)
        target = logits.gather(1, y.repeat(k)[:, None]).squeeze(1)
        total[start : start + k] = (original.repeat(k) - target).view(k, n).sum(1)
    return total


def _ablated_logits(model, layer, x, keep: Tensor) -> Tensor:
    k, n = keep.shape[0], x.shape[0]

    def expand(_, __, out):
        shape = (k, 1, keep.shape[1]) + (1,) * (out.dim() - 2)
        return (out.unsqueeze(0) * keep.view(shape)).reshape(k * n, *out.shape[1:])

    def in_place(_, __, out):
        shape = (k, 1, keep.shape[1]) + (1,) * (out.dim() - 2)
        return (out.view(k, n, *out.shape[1:]) * keep.view(shape)).reshape(out.shape)

    handle = layer.register_forward_hook(expand)
    try:
        logits = model(x)
        if logits.shape[0] == k * n:
            return logits
    except RuntimeError:
        pass
    finally:
        handle.remove()
    handle = layer.register_forward_hook(in_place)
    try:
        return model(x.repeat(k, *([1] * (x.dim() - 1))))
    finally:
        handle.remove()


def captum_ablation_scores(model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Reference: captum ``LayerFeatureAblation`` with one feature group per output channel, mean over samples.

    Slower than the built-in ``"ablation"`` method; kept to show both give the same numbers.
    """
    with torch.no_grad():
        out_shape = None

        def grab(_, __, out):
            nonlocal out_shape
            out_shape = out.shape

        h = layer.register_forward_hook(grab)
        model(x[:1])
        h.remove()
        mask = torch.arange(out_shape[1], device=x.device).view(1, -1, *([1] * (len(out_shape) - 2)))
        mask = mask.expand(1, *out_shape[1:])
        attr = LayerFeatureAblation(model, layer).attribute(x, target=y, layer_mask=mask, layer_baselines=0.0)
    # captum gives every element of a feature group the group's total: read one element per channel.
    return attr.reshape(attr.shape[0], attr.shape[1], -1)[:, :, 0].double().mean(0)


_SCORERS: dict[str, Callable] = {
    "grad_x_act": _grad_x_act,
    "gradcam": _gradcam,
    "conductance": _conductance,
    "ablation": _ablation,
    "weight_saliency": _weight_saliency,
}


# -- helpers -------------------------------------------------------------------------------
def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


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
