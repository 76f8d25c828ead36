"""UnlearningReport: everything an auditor needs to check one unlearning run, as JSON.

Written next to the unlearned checkpoint. Hashes are over the state dict's contents
(names, dtypes, shapes, bytes), so they identify the weights whatever the file format and
can be recomputed from a loaded model or a saved file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from lightning_unlearn._io import ON_EXISTS, load_torch_file, save_torch, unique_path, write_json
from lightning_unlearn.mask import ParameterMask

REPORT_VERSION = 1
__all__ = ["UnlearningReport", "library_versions", "save_weights", "weights_sha256"]
_PACKAGES = ("lightning-unlearn", "torch", "lightning", "torchmetrics", "captum", "scikit-learn", "numpy", "flwr")


def weights_sha256(weights: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike) -> str:
    """SHA-256 of a model's state dict (or of a state dict / a file written by :func:`save_weights`)."""
    if isinstance(weights, (str, os.PathLike)):
        weights = load_torch_file(weights, "weights file")
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | os.PathLike, on_exists: str = "suffix") -> Path:
    """Write ``model.state_dict()`` atomically to a new file; returns the path actually written."""
    path = unique_path(path, on_exists)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_torch(state, path, overwrite=False)


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape the result."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class UnlearningReport:
    """One unlearning run: what was asked, what was done, what it achieved, at what cost.

    ``metrics`` maps ``"original"``, ``"unlearned"`` and ``"retrained"`` (when a reference
    was trained) to flat metric dicts; ``comparison`` holds cross-model numbers (Avg. Gap,
    relearn steps). ``bytes_moved`` is for federated runs (e.g. ``{"up": ..., "down": ...}``);
    ``extra`` holds what an engine adds (per-round rows of a Flower run).
    """

    request: dict
    method: str
    params: dict
    seed: int
    original_sha256: str
    unlearned_sha256: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    mask: dict | None = None
    mask_file: str | None = None
    checkpoint: str | None = None
    retrained_sha256: str | None = None
    bytes_moved: dict[str, int] | None = None
    plots: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report_version: int = REPORT_VERSION

    @staticmethod
    def mask_summary(mask: ParameterMask | None) -> dict | None:
        """Fraction overall and per layer, selected channels and the mask's hash (no tensors)."""
        return None if mask is None else mask.summary()

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike, on_exists: str = "suffix") -> Path:
        """Write the JSON atomically; an existing file is never overwritten (suffix or FileExistsError)."""
        return write_json(self.to_dict(), unique_path(path, on_exists), overwrite=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "UnlearningReport":
        data = json.loads(Path(path).read_text())
        version = data.get("report_version")
        if version != REPORT_VERSION:
            raise ValueError(f"{path} is report version {version!r}; this library reads version {REPORT_VERSION}")
        return cls(**data)
