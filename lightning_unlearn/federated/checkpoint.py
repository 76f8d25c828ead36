"""The ServerApp's checkpoint: a restarted server resumes unlearning with the same mask."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from lightning_unlearn._io import load_torch_file, save_torch, to_jsonable
from lightning_unlearn.mask import ParameterMask

STATE_FILE = "server_state.pt"


@dataclass
class ServerCheckpoint:
    """What a resumed server needs (``current``: after ``rounds_done`` masked rounds); :meth:`update` rewrites it.
    ``key`` (a hash of the plans) must match for a resume: a checkpoint resumes only the plan that wrote it."""

    key: str
    trained: dict[str, Tensor] | None = None
    training: list = field(default_factory=list)
    mask: ParameterMask | None = None
    rounds_done: int = 0
    current: dict[str, Tensor] | None = None
    unlearning: list = field(default_factory=list)
    evaluation: list = field(default_factory=list)
    folder: str | os.PathLike | None = None

    def update(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        self.save(self.folder)

    def save(self, folder: str | os.PathLike) -> Path:
        state = {k: to_jsonable(v) if isinstance(v, list) else v for k, v in vars(self).items() if k != "folder"}
        state["mask"] = self.mask.to_checkpoint() if self.mask is not None else None
        return save_torch(state, Path(folder) / STATE_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike, key: str) -> "ServerCheckpoint | None":
        """The checkpoint in ``folder`` (None if there is none); ValueError if it belongs to another plan."""
        path = Path(folder) / STATE_FILE
        if not path.exists():
            return None
        state = load_torch_file(path, "server checkpoint")
        if not isinstance(state, Mapping) or "key" not in state:
            raise ValueError(f"server checkpoint {path} is not a lightning-unlearn server state")
        if state["key"] != key:
            raise ValueError(f"server checkpoint {path} was written by another plan (key {str(state['key'])[:12]}, "
                             f"this plan {key[:12]}); remove it or choose another checkpoint-dir")
        saved = {k: state[k] for k in ("trained", "training", "current", "unlearning", "evaluation") if state.get(k)}
        mask = ParameterMask.from_checkpoint(state["mask"]) if state.get("mask") is not None else None
        return cls(key, mask=mask, rounds_done=int(state.get("rounds_done", 0)), folder=folder, **saved)


__all__ = ["STATE_FILE", "ServerCheckpoint"]
