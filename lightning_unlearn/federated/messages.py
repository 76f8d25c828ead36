"""What crosses the client/server boundary, and nothing else.

Every message is a frozen dataclass that checks its own contents: named float tensors
(parameters, updates, selected slices, per-channel score vectors), integer sample counts,
scalar metrics and structural metadata. No sample, label or per-sample value fits in one.
The :class:`Transport` carries messages between server and clients, counts the bytes each
way and can record every message, so tests can assert on exactly what the server saw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

INDEX_BYTES = 4  # channel indices travel as int32


def _check_arrays(arrays: Mapping[str, Tensor], what: str, one_dim: bool = False) -> None:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{what} must be a mapping name -> tensor, got {type(arrays).__name__}")
    for name, t in arrays.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"{what} must map str -> Tensor, got {type(name).__name__} -> {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{name!r}] must be a float tensor (parameters or scores), got {t.dtype}")
        if one_dim and t.dim() != 1:
            raise ValueError(f"{what}[{name!r}] must be a 1-D vector, got shape {tuple(t.shape)}")


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TypeError(f"num_samples must be a non-negative int, got {n!r}")


def _check_metrics(metrics: Mapping[str, float]) -> None:
    for k, v in metrics.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"metrics must map str -> scalar number, got {k!r} -> {type(v).__name__}")


def tensor_bytes(arrays: Mapping[str, Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))


# -- server -> client ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Broadcast:
    """Server -> client: full model arrays (FedAvg), or only the selected slices (masked rounds).

    ``channels`` is the selected-channel mask, sent once (first masked round) as int32 indices;
    ``config`` holds round settings (seed, epochs, objective).
    """

    arrays: Mapping[str, Tensor]
    config: Mapping[str, Any] = field(default_factory=dict)
    channels: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        _check_arrays(self.arrays, "Broadcast.arrays")

    @property
    def nbytes(self) -> int:
        mask = 0 if self.channels is None else INDEX_BYTES * sum(len(v) for v in self.channels.values())
        return tensor_bytes(self.arrays) + mask


# -- client -> server ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ParametersMessage:
    """Client -> server after local training: its model arrays (or arrays of an update) and sample count."""

    arrays: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_arrays(self.arrays, "ParametersMessage.arrays")
        _check_count(self.num_samples)
        _check_metrics(self.metrics)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.arrays) + 8


@dataclass(frozen=True)
class MaskedUpdateMessage:
    """Client -> server after a masked round: only the selected elements, flattened per parameter."""

    values: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_arrays(self.values, "MaskedUpdateMessage.values", one_dim=True)
        _check_count(self.num_samples)
        _check_metrics(self.metrics)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.values) + 8


@dataclass(frozen=True)
class ScoresMessage:
    """Client -> server: one mean score per output channel and layer, over ``num_samples`` local samples.

    ``layers`` is structural metadata (layer name -> (out_channels, batchnorm name, is_head)),
    ``tag`` names what was scored (``"forget"``, or a CDP document such as ``"class_3"``).
    """

    scores: Mapping[str, Tensor]
    num_samples: int
    method: str
    layers: Mapping[str, tuple[int, str | None, bool]] = field(default_factory=dict)
    tag: str = "forget"

    def __post_init__(self) -> None:
        _check_arrays(self.scores, "ScoresMessage.scores", one_dim=True)
        _check_count(self.num_samples)
        for name, meta in self.layers.items():
            out, bn, head = meta
            if not isinstance(out, int) or not (bn is None or isinstance(bn, str)) or not isinstance(head, bool):
                raise TypeError(f"ScoresMessage.layers[{name!r}] must be (int, str | None, bool), got {meta!r}")
            if name in self.scores and self.scores[name].numel() != out:
                raise ValueError(f"layer {name!r}: {self.scores[name].numel()} scores for {out} channels")

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.scores) + 8


UPWARD = (ParametersMessage, MaskedUpdateMessage, ScoresMessage)


def check_upward(messages, allowed: tuple[type, ...] = UPWARD) -> list:
    """Server-side guard: a list of client messages of the allowed types, or TypeError naming the intruder."""
    out = list(messages)
    for m in out:
        if not isinstance(m, allowed):
            raise TypeError(
                f"the server only accepts {[t.__name__ for t in allowed]} from clients, got {type(m).__name__}"
            )
    return out


def message_payload(message: Any) -> dict[str, Any]:
    """Field name -> value of a message (what a test inspects)."""
    return {f.name: getattr(message, f.name) for f in fields(message)}


# -- the wire ------------------------------------------------------------------------------------
@dataclass
class RoundBytes:
    """Bytes sent in one round: server -> clients (down) and clients -> server (up)."""

    down: int = 0
    up: int = 0

    @property
    def total(self) -> int:
        return self.down + self.up


class Transport:
    """In-process stand-in for the network: calls a client handler, counts bytes, optionally records.

    ``call(client, "fit", message)`` runs ``client.fit(message)`` and returns the reply (one
    message or a list) after type-checking it; ``None`` means the client had nothing to send.
    """

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self.log: list[tuple[str, int, str, Any]] = []  # (direction, client id, operation, message)
        self.rounds: dict[str, RoundBytes] = {}
        self._current = "setup"

    def start_round(self, label: str) -> RoundBytes:
        self._current = label
        self.rounds[label] = RoundBytes()  # a label reused by a later run starts from zero
        return self.rounds[label]

    def call(self, client: Any, operation: str, message: Any = None) -> Any:
        bytes_ = self.rounds.setdefault(self._current, RoundBytes())
        if message is not None:
            if not isinstance(message, Broadcast):
                raise TypeError(f"the server sends Broadcast messages, got {type(message).__name__}")
            bytes_.down += message.nbytes
            if self.record:
                self.log.append(("down", client.client_id, operation, message))
        handler: Callable = getattr(client, operation)
        reply = handler(message) if message is not None else handler()
        if reply is None:
            return None
        replies = check_upward(reply if isinstance(reply, list) else [reply])
        for r in replies:
            bytes_.up += r.nbytes
            if self.record:
                self.log.append(("up", client.client_id, operation, r))
        return reply

    def bytes_for(self, prefix: str) -> list[RoundBytes]:
        return [b for label, b in self.rounds.items() if label.startswith(prefix)]


def mean_round_bytes(rounds: list[RoundBytes]) -> float:
    return float(sum(r.total for r in rounds) / len(rounds)) if rounds else math.nan
