"""Channel scores -> ParameterMask: which parameter elements unlearning may change."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_unlearn.config import check_ratio, check_scope
from lightning_unlearn.mask.parameter_mask import ParameterMask
from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.scoring.layers import LayerInfo


def select_channels(
    scores: ChannelScores | Mapping[str, Tensor],
    model: nn.Module,
    ratio: float = 0.1,
    scope: str = "layer",
    threshold: float | None = None,
    include_head: bool = False,
    head_rows: Sequence[int] | None = None,
    layers: Mapping[str, LayerInfo] | None = None,
) -> ParameterMask:
    """Pick the channels most tied to the forget data and turn them into a :class:`ParameterMask`.

    Args:
        ratio: fraction of channels to select, in (0, 1]: per layer (``scope="layer"``) or over all
            layers (``scope="global"``, scores min-max normalised per layer so layers compare).
        threshold: instead of a ratio, select channels whose per-layer normalised score >= threshold.
        include_head: let the classifier head's rows be selected by score like any layer.
        head_rows: head rows always selected (the forgotten classes' output rows for class requests).
        layers: layer metadata (BatchNorm, head); taken from ``scores.layers`` when omitted.
    """
    check_ratio(ratio)
    check_scope(scope)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")  # NaN fails here too
    layers = layers if layers is not None else getattr(scores, "layers", None)
    if layers is None:
        raise ValueError("layer metadata missing: pass layers= (from discover_layers) or ChannelScores")
    modules = dict(model.named_modules())
    unknown = [n for n in scores if n not in modules]
    if unknown:
        raise ValueError(f"scores name layers the model does not have: {unknown}")
    head = next((n for n, i in layers.items() if i.is_head), None)
    ranked = {n: s.float().cpu() for n, s in scores.items() if include_head or n != head}
    normalised = {n: _minmax(s) for n, s in ranked.items()}
    if threshold is not None:
        chosen = {n: torch.nonzero(s >= threshold).flatten().tolist() for n, s in normalised.items()}
    elif scope == "layer":
        chosen = {n: torch.topk(s, max(1, math.ceil(ratio * s.numel()))).indices.tolist() for n, s in ranked.items()}
    else:
        flat = torch.cat([normalised[n] for n in normalised])
        owners = [(n, c) for n in normalised for c in range(normalised[n].numel())]
        top = torch.topk(flat, max(1, math.ceil(ratio * flat.numel()))).indices.tolist()
        chosen = {n: [] for n in normalised}
        for i in top:
            chosen[owners[i][0]].append(owners[i][1])
    if head_rows:
        if head is None:
            raise ValueError("head_rows given but the model's head layer is unknown")
        out = layers[head].out_channels
        bad = [r for r in head_rows if not 0 <= r < out]
        if bad:
            raise ValueError(f"head row(s) {bad} out of range; the head {head!r} has rows 0..{out - 1}")
        chosen[head] = sorted(set(chosen.get(head, [])) | set(int(r) for r in head_rows))
    return ParameterMask.from_channels(model, chosen, layers)


def _minmax(s: Tensor) -> Tensor:
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)


def head_parameter_scales(
    mask: ParameterMask, layers: Mapping[str, LayerInfo], factor: float | None
) -> dict[str, float]:
    """``{head parameter name: factor}`` for the head's parameters that ``mask`` selects (empty without a factor)."""
    if factor is None:
        return {}
    out = {}
    for name, info in layers.items():
        if not info.is_head:
            continue
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}" if name else suffix
            if key in mask.masks and bool(mask.masks[key].any()):
                out[key] = float(factor)
    return out
