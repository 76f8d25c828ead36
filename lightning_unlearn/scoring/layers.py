"""Which layers a model has to score: Conv/Linear layers in execution order, their norm layer and the head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.scoring.base import out_channels

SCORED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Per-channel normalisation fed by a layer: its affine weight/bias follow the layer's selected channels.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


@dataclass(frozen=True)
class LayerInfo:
    """A scorable layer: its output channels, the BatchNorm/GroupNorm fed by it, whether it is the model's head."""

    name: str
    out_channels: int
    batchnorm: str | None = None
    is_head: bool = False


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
    try:
        modes = eval_modes(model)
        with torch.no_grad():
            model(example_input)
    finally:
        restore_modes(modes)
        for h in handles:
            h.remove()
    head = order[-1] if order else None
    chosen = [n for n in order if layers is None or n in layers]
    return {
        n: LayerInfo(n, out_channels(candidates[n]), bn_of.get(n), n == head) for n in chosen
    }


def layer_info(model: nn.Module, datamodule: Any) -> dict[str, LayerInfo]:
    """Scorable layers of ``model``, traced on one training sample of ``datamodule`` (``train_dataset[0]``)."""
    x = datamodule.train_dataset[0][0][None]
    return discover_layers(model, x.to(next(model.parameters()).device))
