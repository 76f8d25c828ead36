"""The population harness's method interface: what an unlearning procedure receives and returns.

A method is a plain function ``Task -> torch.nn.Module``. The harness builds one :class:`Task` per
population member (a fresh deep copy of one trained original, the request's data module, the
original's training recipe and a seed derived from the member), times the call and evaluates the
returned model against retrained populations. Methods from other code bases plug in through a file
exposing ``PEERS: dict[str, Method]`` (``population.py --plugin path/to/file.py``); its entries become
selectable method names. The interface is kept stable: add fields at the end, never rename.
"""
from __future__ import annotations

import importlib.util
import hashlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch

from lightning_unlearn.data.unlearning import UnlearningDataModule


@dataclass
class Task:
    """One unlearning job: forget ``datamodule.request`` from ``original``.

    ``original``: a fresh deep copy of one trained original (the method may modify it in place).
    ``datamodule``: the request and its splits (``forget_dataloader()``, ``retain_dataloader()``,
    ``forget_set``, ``retain_set``, ``test_dataset``, ``forget_indices`` ...); a fresh object per task.
    ``recipe``: the original's training, ``{"epochs", "batch_size", "optimizer", "lr", "weight_decay",
    "steps_per_epoch", "architecture"}`` (the optimizer the model's ``configure_optimizers`` builds).
    ``num_classes``: classes of the task. ``seed``: derived per population member (seed your randomness with it).
    """

    original: pl.LightningModule
    datamodule: UnlearningDataModule
    recipe: dict[str, Any]
    num_classes: int
    seed: int


Method = Callable[[Task], torch.nn.Module]


def method_fingerprint(method: Method) -> str:
    """SHA-256 of a method's source and of its module's file (an edited method or helper gets a new cache key)."""
    parts = [f"{getattr(method, '__module__', '?')}.{getattr(method, '__qualname__', repr(method))}"]
    if getattr(method, "fingerprint", None):  # a method that names what determines it (e.g. the library's sources)
        return hashlib.sha256("\n".join(parts + [method.fingerprint]).encode()).hexdigest()
    module = sys.modules.get(getattr(method, "__module__", ""), None)
    snapshot = getattr(module, "SOURCE_AT_IMPORT", None)  # the code that runs, even if the file was edited since
    if snapshot is not None:
        parts.append(snapshot)
    else:
        try:
            parts.append(Path(inspect.getsourcefile(method) or "").read_text())
        except (OSError, TypeError):
            pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_plugin(path: str | Path) -> dict[str, Method]:
    """The ``PEERS`` mapping of a plugin file (name -> Method); fails with one line on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plugin {str(path)!r} is not a file; pass a .py file exposing PEERS: dict[str, Method]")
    spec = importlib.util.spec_from_file_location(f"population_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    source = path.read_text()
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.SOURCE_AT_IMPORT = source
    peers = getattr(module, "PEERS", None)
    if not isinstance(peers, dict) or not all(isinstance(k, str) and callable(v) for k, v in peers.items()):
        raise ValueError(f"plugin {str(path)!r} must expose PEERS: dict[str, Method] (name -> callable)")
    return dict(peers)
