"""ParameterMask: boolean masks over a model's parameters (True = may change during unlearning)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.scoring.layers import LayerInfo


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
