"""Channel scores -> ParameterMask: which parameter elements unlearning may change."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.attribution import ChannelScores, LayerInfo

SCOPES = ("layer", "global")


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed scopes are {list(SCOPES)}")
    return scope


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return ratio


class ParameterMask:
    """Boolean masks over a model's parameters: True = trainable during unlearning.

    ``channels`` records which output channels of which layer were selected (for reports
    and plots); the boolean tensors are the source of truth for masking.
    """

    def __init__(self, masks: Mapping[str, Tensor], channels: Mapping[str, Sequence[int]] | None = None) -> None:
        self.masks = {k: v.detach().to(torch.bool).cpu() for k, v in masks.items()}
        self.channels = {k: [int(c) for c in v] for k, v in (channels or {}).items()}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def empty(cls, model: nn.Module) -> "ParameterMask":
        return cls({n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()})

    @classmethod
    def full(cls, model: nn.Module) -> "ParameterMask":
        """Every parameter trainable (the fine-tune-all control)."""
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})

    @classmethod
    def from_channels(
        cls, model: nn.Module, channels: Mapping[str, Sequence[int]], layers: Mapping[str, LayerInfo]
    ) -> "ParameterMask":
        """Select whole channels: conv ``weight[c]``/``bias[c]``, linear rows, and the BatchNorm fed by the layer."""
        mask = cls.empty(model)
        for layer, idx in channels.items():
            if not len(idx):
                continue
            index = torch.as_tensor(list(idx), dtype=torch.long)
            owners = [layer] + ([layers[layer].batchnorm] if layer in layers and layers[layer].batchnorm else [])
            for owner in owners:
                for pname in ("weight", "bias"):
                    key = f"{owner}.{pname}" if owner else pname
                    if key in mask.masks:
                        mask.masks[key][index] = True
        mask.channels = {k: sorted(int(c) for c in v) for k, v in channels.items() if len(v)}
        return mask

    # -- reporting ---------------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def num_total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    @property
    def fraction(self) -> float:
        """Selected parameter elements / all parameter elements."""
        return self.num_selected / max(1, self.num_total)

    def layer_fractions(self) -> dict[str, float]:
        """Fraction selected per module (parameters grouped by their owning module)."""
        groups: dict[str, list[Tensor]] = {}
        for name, m in self.masks.items():
            groups.setdefault(name.rpartition(".")[0], []).append(m)
        return {k: sum(int(m.sum()) for m in v) / sum(m.numel() for m in v) for k, v in groups.items()}

    def summary(self) -> dict:
        return {
            "fraction": self.fraction,
            "selected": self.num_selected,
            "total": self.num_total,
            "per_layer": self.layer_fractions(),
            "channels": self.channels,
            "sha256": self.sha256(),
        }

    def sha256(self) -> str:
        """Content hash: equal on every DDP rank iff the masks are identical."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(self.masks[name].numpy().tobytes())
        return h.hexdigest()

    # -- checks and persistence --------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise if the mask does not match ``model``'s parameter names and shapes."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.masks) - set(params))
        extra = sorted(set(params) - set(self.masks))
        if missing or extra:
            raise ValueError(
                f"mask does not match the model: mask-only parameters {missing[:5]}, model-only parameters {extra[:5]}"
            )
        bad = [(n, tuple(m.shape), tuple(params[n].shape)) for n, m in self.masks.items() if m.shape != params[n].shape]
        if bad:
            raise ValueError(f"mask shapes do not match the model (name, mask, parameter): {bad[:5]}")

    def state_dict(self) -> dict[str, Tensor]:
        """``{parameter name: bool tensor of that parameter's shape}``."""
        return dict(self.masks)

    def to_checkpoint(self) -> dict:
        return {"masks": self.state_dict(), "channels": self.channels}

    @classmethod
    def from_checkpoint(cls, state: dict) -> "ParameterMask":
        return cls(state["masks"], state.get("channels"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename)."""
        return save_torch(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ParameterMask":
        """Read a file written by :meth:`save` (``weights_only=True``; shapes and types checked)."""
        state = load_torch_file(path, "mask file")
        masks = state.get("masks") if isinstance(state, dict) else None
        if not isinstance(masks, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in masks.items()):
            raise ValueError(f"mask file {path} does not hold a ParameterMask (expected a dict of boolean tensors)")
        return cls.from_checkpoint(state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParameterMask) and self.sha256() == other.sha256()

    def __repr__(self) -> str:
        return f"ParameterMask(fraction={self.fraction:.4f}, selected={self.num_selected}/{self.num_total})"


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
