"""The server's one resume file: FedAvg's rounds, then unlearning's mask and masked rounds (same mask on restart)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from lightning_unlearn._io import load_torch_file, save_torch, to_jsonable
from lightning_unlearn.mask import ParameterMask

STATE_FILE = "server_state.pt"
ROWS = ("training", "unlearning", "evaluation", "stopping")


@dataclass
class ServerCheckpoint:
    """``trained``: the global arrays after ``len(training)`` FedAvg rounds (``store``: FedEraser's updates); then
    ``current`` after ``rounds_done`` masked rounds with ``mask`` (``stopping``: the rule's state after them).
    ``key``: named hashes of the run that wrote it."""

    folder: str | os.PathLike | None = None
    key: dict[str, str] = field(default_factory=dict)
    trained: dict[str, Tensor] | None = None
    training: list = field(default_factory=list)
    store: list | None = None
    mask: ParameterMask | None = None
    rounds_done: int = 0
    current: dict[str, Tensor] | None = None
    unlearning: list = field(default_factory=list)
    evaluation: list = field(default_factory=list)
    stopping: dict | None = None  # the repair's stopping rule: the deployed model's accuracies and every check

    def update(self, **fields: Any) -> None:
        """Take ``fields`` and rewrite the file (none without a ``folder``: the run keeps its state in memory)."""
        self.__dict__.update(fields)
        if self.folder is not None:
            state = {k: to_jsonable(v) if k in ROWS else v for k, v in vars(self).items() if k != "folder"}
            state["mask"] = self.mask.to_checkpoint() if self.mask is not None else None
            save_torch(state, Path(self.folder) / STATE_FILE)

    @classmethod
    def open(cls, folder: str | os.PathLike, key: Mapping[str, str], resume: bool = True) -> "ServerCheckpoint":
        """The checkpoint in ``folder`` to continue (a fresh one without a file or ``resume``); ValueError naming
        the file and what changed if another run wrote it."""
        path, key = Path(folder) / STATE_FILE, dict(key)
        if not resume or not path.exists():
            return cls(folder, key)
        state = load_torch_file(path, "server checkpoint")
        if not isinstance(state, Mapping) or not isinstance(state.get("key"), Mapping):
            raise ValueError(f"server checkpoint {path} is no server state of this lightning-unlearn version; "
                             "remove it or use another checkpoint folder")
        if changed := sorted(k for k in {*state["key"], *key} if state["key"].get(k) != key.get(k)):
            raise ValueError(f"{path} was written by a different run ({', '.join(changed)} changed); start fresh "
                             "(resume=False, --federated.fresh true) or use another checkpoint folder")
        mask = ParameterMask.from_checkpoint(state["mask"]) if state.get("mask") is not None else None
        saved = {k: state[k] for k in ("trained", "store", "current", *ROWS) if state.get(k) is not None}
        return cls(folder, key, mask=mask, rounds_done=int(state.get("rounds_done", 0)), **saved)
