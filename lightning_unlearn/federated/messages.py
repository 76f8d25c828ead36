"""What crosses the client/server boundary, and nothing else.

Every message is a frozen dataclass that checks its own types: named float tensors
(parameters, updates, selected slices, per-channel score vectors), integer sample counts,
scalar metrics and structural metadata. The server then checks each reply against its
**contract** (:func:`check_upward`, and the aggregation functions in
:mod:`~lightning_unlearn.federated.server`, which know the expected shapes): exactly the keys
its kind allows, each of exactly the expected shape, dtype and finite values; at most
:data:`MAX_METRICS` metrics named in :data:`METRIC_KEYS`, each a finite scalar; short method
names and tags from known sets. A violation is a one-line ValueError naming the client and
the key, so a sample, a label or a dump cannot ride along in an extra key, an odd shape, a
metric or a string.

What the contract cannot catch: values hidden *inside* legitimately shaped arrays (an image
encoded into a parameter tensor's values or into score values, a few bits per float of a
metric). Only the server's view of each client's values can be narrowed: secure aggregation
(not implemented here) lets it see only the sum over clients, and differential privacy bounds what any value can
reveal about a sample (``lightning_unlearn.privacy``). Validation is not robust aggregation
either: a well-formed but poisoned update (or an inflated ``num_samples``) passes.

On the wire these messages are Flower records (:mod:`~lightning_unlearn.federated.records`);
:class:`RoundBytes` holds what one round moved each way.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

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


@dataclass(frozen=True)
class BatchNormStatsMessage:
    """Client -> server in the statistics round after a reset: the moments of each selected BatchNorm channel's input.

    ``moments[bn]`` is a float64 ``(3, k)`` tensor for the ``k`` selected channels of BatchNorm ``bn`` (in
    channel order): row 0 the number of values (samples x positions, the same for every channel), row 1 their
    sum, row 2 their sum of squares, over at most ``max_batches`` local retain batches of ``num_samples``
    samples. Sums pool exactly over clients, so the server's mean and variance are those of the union of
    the clients' data (:func:`~lightning_unlearn.federated.server.pool_batchnorm_moments`). Like CDP's mean
    activations, they are per-channel aggregates, never per-sample values.
    """

    moments: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_arrays(self.moments, "BatchNormStatsMessage.moments")
        for name, t in self.moments.items():
            if t.dim() != 2 or t.shape[0] != 3:
                raise ValueError(f"BatchNormStatsMessage.moments[{name!r}] must have shape (3, channels) "
                                 f"(count, sum, sum of squares), got {tuple(t.shape)}")
        _check_count(self.num_samples)
        _check_metrics(self.metrics)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.moments) + 8


UPWARD = (ParametersMessage, MaskedUpdateMessage, ScoresMessage, BatchNormStatsMessage)

# -- the contract ----------------------------------------------------------------------------------
#: Every metric a library client sends, and nothing else: ``local_fit`` (every training reply),
#: the DP callback's epsilon, Flower's sample count and ``hello`` id, Flower's evaluation reply.
METRIC_KEYS = frozenset({
    "local_compute_s", "fit_s",
    "dp/epsilon",
    "num-examples", "client-id",
    "forget-acc", "retain-acc", "all-acc", "forget-examples", "retain-examples", "all-examples",
})
MAX_METRICS = 16
MAX_TEXT_CHARS = 64  # method names and tags
MAX_NAME_CHARS = 256  # parameter and layer names (module paths)
CDP_METHOD = "cdp_activation"  # CDP's statistic (mean activation per channel), not a scoring method
TAG_PATTERN = re.compile(r"forget|class_\d{1,9}")  # what was scored: the forget set or one retained class


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error message must not echo a smuggled dump."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def sender_label(senders: Sequence[Any] | None, i: int) -> str:
    """``client <id>`` when the server knows who sent reply ``i``, else ``reply <i>``."""
    return f"client {senders[i]}" if senders is not None else f"reply {i}"


def _scoring_methods() -> tuple[str, ...]:
    from lightning_unlearn.scoring.base import registry_views  # the live registry: user-registered methods count

    return (*registry_views()["SCORING_METHODS"], CDP_METHOD)


def check_metrics(metrics: Mapping[str, Any], who: str, kind: str) -> None:
    """At most :data:`MAX_METRICS` entries, keys from :data:`METRIC_KEYS`, finite scalar values."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{who}: {kind} metrics must be a mapping, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{who}: {kind} has {len(metrics)} metrics (at most {MAX_METRICS} allowed)")
    for key, value in metrics.items():
        if key not in METRIC_KEYS:
            raise ValueError(f"{who}: {kind} has unexpected metric {short_repr(key)} "
                             f"(allowed: {', '.join(sorted(METRIC_KEYS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{who}: {kind} metric {key!r} must be a finite scalar, got {short_repr(value)}")


def _check_text(value: Any, who: str, kind: str, field_: str, allowed: str, ok: Callable[[str], bool]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{who}: {kind} {field_} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{who}: {kind} {field_} has {len(value)} characters (at most {MAX_TEXT_CHARS} allowed)")
    if not ok(value):
        raise ValueError(f"{who}: {kind} has unknown {field_} {value!r} (allowed: {allowed})")


def check_metadata(message: Any, who: str) -> None:
    """The model-independent part of the contract: sample count, metrics, method, tag, layer names."""
    kind = type(message).__name__
    n = message.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{who}: {kind} num_samples must be a non-negative int, got {short_repr(n)}")
    if isinstance(message, ScoresMessage):
        methods = _scoring_methods()
        _check_text(message.method, who, kind, "method", ", ".join(methods), lambda m: m in methods)
        _check_text(message.tag, who, kind, "tag", "'forget' or 'class_<int>'",
                    lambda t: TAG_PATTERN.fullmatch(t) is not None)
        for name, meta in message.layers.items():
            bn = meta[1] if isinstance(meta, tuple) and len(meta) == 3 and isinstance(meta[1], str) else ""
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or len(bn) > MAX_NAME_CHARS:
                raise ValueError(f"{who}: {kind} layer name {short_repr(name)} (norm {short_repr(bn)}) is not a "
                                 f"module name of at most {MAX_NAME_CHARS} characters")
    else:
        check_metrics(message.metrics, who, kind)


def check_arrays(
    arrays: Mapping[str, Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
    who: str,
    kind: str,
    describe: str,
    vector: tuple[str, str] | None = None,
) -> None:
    """Exactly the ``expected`` keys, each of its shape (and dtype, when given) with finite values.

    ``describe`` says what was expected as a whole (``"the 14 model arrays"``); ``vector`` words a
    wrong length of a 1-D vector (``("values", "selected elements")``: "3 values for 10 selected elements").
    """
    for key in arrays:
        if key not in expected:
            raise ValueError(f"{who}: {kind} has unexpected key {short_repr(key)} (expected {describe})")
    for key, (shape, dtype) in expected.items():
        if key not in arrays:
            raise ValueError(f"{who}: {kind} is missing key {key!r} (expected {describe})")
        t = arrays[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {kind} {key!r} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            if vector is not None and t.dim() == 1:
                raise ValueError(f"{who}: {kind} {key!r} has {t.numel()} {vector[0]} for {shape[0]} {vector[1]}")
            raise ValueError(f"{who}: {kind} {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{who}: {kind} {key!r} has dtype {t.dtype}, expected {dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{who}: {kind} {key!r} holds non-finite values (NaN or inf)")


def check_upward(messages, allowed: tuple[type, ...] = UPWARD, senders: Sequence[Any] | None = None) -> list:
    """Server-side guard: client messages of the allowed types whose metadata keeps the contract.

    ``senders`` names who sent each message (the server's client ids), for the errors. Keys and
    shapes need the model: the aggregation functions check them.
    """
    out = list(messages)
    if senders is not None and len(senders) != len(out):
        raise ValueError(f"{len(senders)} senders for {len(out)} messages")
    for i, m in enumerate(out):
        if not isinstance(m, allowed):
            raise TypeError(
                f"{sender_label(senders, i)}: the server only accepts {[t.__name__ for t in allowed]} from clients, "
                f"got {type(m).__name__}"
            )
        check_metadata(m, sender_label(senders, i))
    return out


# -- the wire ------------------------------------------------------------------------------------
@dataclass
class RoundBytes:
    """Bytes sent in one round: server -> clients (down) and clients -> server (up)."""

    down: int = 0
    up: int = 0

    @property
    def total(self) -> int:
        return self.down + self.up
