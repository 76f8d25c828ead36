"""What crosses the client/server boundary, and nothing else: the message types and their Flower records.

The server rebuilds each reply from its ``RecordDict``, refusing records or keys its kind does not carry, and
checks it (:func:`check_upward`; :mod:`~lightning_unlearn.federated.server` knows the shapes), so a sample or a
label cannot ride along in an extra key, an odd shape, a metric or a string; a violation is a one-line error naming
the client and the key. Values hidden inside well-shaped arrays are for secure aggregation and DP to address.
Tensors travel packed, one ``uint8`` Array per record plus a JSON layout: Flower moves each Array as an object of
its own (SmallCNN: 27 objects a message unpacked, 7 packed). ``payload`` bytes: 4 per channel index, 8 per count.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

INDEX_BYTES = 4  # channel indices travel as int32
COUNT_BYTES = 8  # a sample count
COUNT_KEY = "num-examples"  # Flower's conventional sample-count key
#: Every metric a library client sends: ``local_fit``'s times, DP epsilon, sample count, ``hello`` id, evaluation.
METRIC_KEYS = frozenset({
    "local_compute_s", "fit_s", "dp/epsilon", "num-examples", "client-id",
    "forget-acc", "retain-acc", "all-acc", "forget-examples", "retain-examples", "all-examples",
})
MAX_METRICS = 16
MAX_TEXT_CHARS = 64  # method names and tags
MAX_NAME_CHARS = 256  # parameter and layer names (module paths)
MAX_JSON_CHARS = 1 << 20  # a packed layout: ~40 characters a tensor
MAX_LAYERS_JSON_CHARS = 65_536  # the layer table of a ScoresMessage: ~45 characters a layer
CDP_METHOD = "cdp_activation"  # CDP's statistic (mean activation per channel), not a scoring method
TAG_PATTERN = re.compile(r"forget|class_\d{1,9}")  # what was scored: the forget set or one retained class
PACKED_DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1")
CONFIG_TYPES = (int, float, str, bool, bytes)


def tensor_bytes(arrays: Mapping[str, Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error message must not echo a smuggled dump."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def sender_label(senders: Sequence[Any] | None, i: int) -> str:
    return f"client {senders[i]}" if senders is not None else f"reply {i}"


def _check_tensors(arrays: Mapping[str, Tensor], what: str, one_dim: bool = False) -> None:
    for name, t in arrays.items():
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"{what} must map str -> Tensor, got {type(name).__name__} -> {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{short_repr(name)}] must be a float tensor (parameters or scores), got {t.dtype}")
        if one_dim and t.dim() != 1:
            raise ValueError(f"{what}[{short_repr(name)}] must be a 1-D vector, got shape {tuple(t.shape)}")


# -- the messages ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Broadcast:
    """Server -> client: full model arrays (FedAvg) or the selected slices (masked rounds), round settings, and
    with a client's first masked round the selected-channel mask."""

    arrays: Mapping[str, Tensor]
    config: Mapping[str, Any] = field(default_factory=dict)
    channels: Mapping[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        _check_tensors(self.arrays, "Broadcast.arrays")

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.arrays) + INDEX_BYTES * sum(len(v) for v in (self.channels or {}).values())


@dataclass(frozen=True)
class _Reply:
    """Client -> server: named float tensors (the field ``FIELD``) and the number of samples behind them."""

    KIND: ClassVar[str] = ""
    FIELD: ClassVar[str] = "arrays"
    ONE_DIM: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_tensors(self.tensors, f"{type(self).__name__}.{self.FIELD}", self.ONE_DIM)
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"num_samples must be a non-negative int, got {short_repr(n)}")
        for k, v in getattr(self, "metrics", {}).items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"metrics must map str -> scalar number, got {short_repr(k)} -> {type(v).__name__}")

    @property
    def tensors(self) -> Mapping[str, Tensor]:
        return getattr(self, self.FIELD)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.tensors) + COUNT_BYTES


@dataclass(frozen=True)
class ParametersMessage(_Reply):
    """After local training: the client's model arrays and sample count."""

    KIND: ClassVar[str] = "parameters"
    arrays: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskedUpdateMessage(_Reply):
    """After a masked round: only the selected elements, flattened per parameter."""

    KIND: ClassVar[str] = "masked_update"
    FIELD: ClassVar[str] = "values"
    ONE_DIM: ClassVar[bool] = True
    values: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoresMessage(_Reply):
    """One mean score per output channel and layer over ``num_samples`` samples; ``layers``: name -> (out_channels,
    BatchNorm name, is_head); ``tag``: what was scored (``"forget"``, or a CDP document such as ``"class_3"``)."""

    KIND: ClassVar[str] = "scores"
    FIELD: ClassVar[str] = "scores"
    ONE_DIM: ClassVar[bool] = True
    scores: Mapping[str, Tensor]
    num_samples: int
    method: str
    layers: Mapping[str, tuple[int, str | None, bool]] = field(default_factory=dict)
    tag: str = "forget"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, meta in self.layers.items():
            if not (isinstance(meta, (tuple, list)) and len(meta) == 3 and type(meta[0]) is int
                    and (meta[1] is None or isinstance(meta[1], str)) and isinstance(meta[2], bool)):
                raise TypeError(f"ScoresMessage.layers[{short_repr(name)}] must be (int, str | None, bool), "
                                f"got {short_repr(meta)}")
            if name in self.scores and self.scores[name].numel() != meta[0]:
                raise ValueError(f"layer {short_repr(name)}: {self.scores[name].numel()} scores for {meta[0]} channels")


@dataclass(frozen=True)
class BatchNormStatsMessage(_Reply):
    """Per selected BatchNorm channel (or head feature), the count, sum and sum of squares of its input (float64
    ``(3, k)``): sums pool exactly over clients and are per-channel aggregates, never per-sample values."""

    KIND: ClassVar[str] = "bn_stats"
    FIELD: ClassVar[str] = "moments"
    moments: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, t in self.moments.items():
            if t.dim() != 2 or t.shape[0] != 3:
                raise ValueError(f"BatchNormStatsMessage.moments[{name!r}] must have shape (3, channels) "
                                 f"(count, sum, sum of squares), got {tuple(t.shape)}")


UPWARD = (ParametersMessage, MaskedUpdateMessage, ScoresMessage, BatchNormStatsMessage)
KINDS = {cls.KIND: cls for cls in UPWARD}


# -- the contract (type, count and metric types: the dataclasses; keys and shapes: check_arrays) --------------
def check_metrics(metrics: Mapping[str, Any], who: str, kind: str) -> None:
    """At most :data:`MAX_METRICS` entries, keys from :data:`METRIC_KEYS`, finite scalar values."""
    if len(metrics) > MAX_METRICS:
        raise ValueError(f"{who}: {kind} has {len(metrics)} metrics (at most {MAX_METRICS} allowed)")
    for key, value in metrics.items():
        if key not in METRIC_KEYS:
            raise ValueError(f"{who}: {kind} has unexpected metric {short_repr(key)} "
                             f"(allowed: {', '.join(sorted(METRIC_KEYS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{who}: {kind} metric {key!r} must be a finite scalar, got {short_repr(value)}")


def check_arrays(
    arrays: Mapping[str, Tensor], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]], who: str,
    kind: str, describe: str, vector: tuple[str, str] | None = None,
) -> None:
    """Exactly the ``expected`` keys, each of its shape (and dtype, when given) with finite values; ``describe``
    words the whole (``"the 14 model arrays"``), ``vector`` a wrong 1-D length (``("values", "selected elements")``)."""
    for key in arrays:
        if key not in expected:
            raise ValueError(f"{who}: {kind} has unexpected key {short_repr(key)} (expected {describe})")
    for key, (shape, dtype) in expected.items():
        if key not in arrays:
            raise ValueError(f"{who}: {kind} is missing key {key!r} (expected {describe})")
        t = arrays[key]
        if tuple(t.shape) != tuple(shape):
            if vector is not None and t.dim() == 1:
                raise ValueError(f"{who}: {kind} {key!r} has {t.numel()} {vector[0]} for {shape[0]} {vector[1]}")
            raise ValueError(f"{who}: {kind} {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{who}: {kind} {key!r} has dtype {t.dtype}, expected {dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{who}: {kind} {key!r} holds non-finite values (NaN or inf)")


def check_upward(messages, allowed: tuple[type, ...] = UPWARD, senders: Sequence[Any] | None = None) -> list:
    """Client messages of the allowed types whose metrics, method, tag and layer names keep the contract (keys
    and shapes need the model: the aggregation functions check them). ``senders`` name the clients in errors."""
    from lightning_unlearn.scoring.base import registry_views  # the live registry: user-registered methods count

    out = list(messages)
    if senders is not None and len(senders) != len(out):
        raise ValueError(f"{len(senders)} senders for {len(out)} messages")
    for i, m in enumerate(out):
        who, kind = sender_label(senders, i), type(m).__name__
        if not isinstance(m, allowed):
            raise TypeError(f"{who}: the server only accepts {[t.__name__ for t in allowed]} from clients, got {kind}")
        if not isinstance(m, ScoresMessage):
            check_metrics(m.metrics, who, kind)
            continue
        methods = (*registry_views()["SCORING_METHODS"], CDP_METHOD)
        texts = {"method": (m.method, ", ".join(methods), lambda v: v in methods),
                 "tag": (m.tag, "'forget' or 'class_<int>'", TAG_PATTERN.fullmatch)}
        for name, (value, allowed_text, ok) in texts.items():
            if not isinstance(value, str):
                raise TypeError(f"{who}: {kind} {name} must be a string, got {type(value).__name__}")
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"{who}: {kind} {name} has {len(value)} characters (at most {MAX_TEXT_CHARS} allowed)")
            if not ok(value):
                raise ValueError(f"{who}: {kind} has unknown {name} {value!r} (allowed: {allowed_text})")
        for name, meta in m.layers.items():
            bn = meta[1] or ""  # the dataclass checked the (int, str | None, bool) triple
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or len(bn) > MAX_NAME_CHARS:
                raise ValueError(f"{who}: {kind} layer name {short_repr(name)} (norm {short_repr(bn)}) is not a "
                                 f"module name of at most {MAX_NAME_CHARS} characters")
    return out


# -- Flower records -------------------------------------------------------------------------------------
def arrays_to_record(arrays: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord, one Array per tensor (in-memory records: a strategy's, ``context.state``)."""
    return ArrayRecord(dict(arrays))


def record_to_arrays(record: ArrayRecord) -> dict[str, Tensor]:
    return dict(record.to_torch_state_dict())


def channels_to_record(channels: Mapping[str, Sequence[int]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.int32).reshape(-1)) for k, v in channels.items()})


def record_to_channels(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(i) for i in v.numpy()) for k, v in record.items()}


def _json(text: Any, ok: Callable[[Any], bool], limit: int = MAX_JSON_CHARS) -> Any:
    """``text`` parsed, or None when it is not JSON of at most ``limit`` characters that ``ok`` accepts."""
    try:
        value = json.loads(text) if isinstance(text, str) and len(text) <= limit else None
        return value if ok(value) else None
    except ValueError:
        return None


def _is_layout(layout: Any) -> bool:
    """``[[name, dtype, shape], ...]`` with unique names, known dtypes and non-negative int dimensions."""
    return isinstance(layout, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in PACKED_DTYPES
        and isinstance(e[2], list) and all(type(d) is int and d >= 0 for d in e[2]) for e in layout
    ) and len({e[0] for e in layout}) == len(layout)


def _pack(records: dict[str, Any], key: str, arrays: Mapping[str, Any]) -> None:
    """``arrays`` (tensors or numpy) as record ``key`` (one uint8 Array) plus ``key-layout`` (their JSON layout)."""
    parts = [torch.as_tensor(v).detach().cpu().numpy() for v in arrays.values()]
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in zip(arrays, parts)]
    records[key] = ArrayRecord({"packed": Array(np.frombuffer(b"".join(a.tobytes() for a in parts), dtype=np.uint8))})
    records[key + "-layout"] = ConfigRecord({"layout": json.dumps(layout)})


def _unpack(content: RecordDict, key: str) -> dict[str, Tensor]:
    """The tensors :func:`_pack` packed under ``key``, plus any Array stored by name, decoded as they are so that
    the receiver's contract refuses what does not belong. A layout that does not fit is a ValueError."""
    record, meta = content[key], content.get(key + "-layout")
    out = {k: a.numpy() for k, a in record.items() if k != "packed"}
    if "packed" in record:
        text = dict(meta).get("layout") if meta is not None else None
        layout = _json(text, _is_layout)
        if layout is None or {e[0] for e in layout} & set(out):
            raise ValueError(f"record {key!r}: {key + '-layout'!r} must hold a 'layout', JSON [[name, dtype in "
                             f"{list(PACKED_DTYPES)}, shape], ...] with unique names, at most {MAX_JSON_CHARS} "
                             f"characters; got {short_repr(text)}")
        blob = record["packed"].numpy()
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, dtype, shape in layout]
        if blob.dtype != np.uint8 or blob.ndim != 1 or sum(sizes) != blob.size:
            raise ValueError(f"record {key!r}: the layout describes {sum(sizes)} bytes, the packed array holds "
                             f"{blob.size} ({blob.dtype}, {blob.ndim}-D; expected uint8, 1-D)")
        for (name, dtype, shape), size, offset in zip(layout, sizes, np.cumsum([0, *sizes])):
            out[name] = np.frombuffer(blob, dtype, size // np.dtype(dtype).itemsize, int(offset)).reshape(shape)
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in out.items()}


def broadcast_to_content(message: Broadcast, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """``extra`` (e.g. the forget request) joins the config: settings, not payload. ``None`` entries are dropped
    (clients read them with ``.get``)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in {**message.config, **(extra or {})}.items()}
    for k, v in config.items():
        one_type = isinstance(v, list) and v and all(isinstance(i, type(v[0])) for i in v)
        if v is not None and not isinstance(v, CONFIG_TYPES) and not (one_type and isinstance(v[0], CONFIG_TYPES)):
            raise TypeError(f"config[{k!r}] = {short_repr(v)} cannot travel in a Flower ConfigRecord; "
                            "allowed: int, float, str, bool, bytes or a non-empty list of one of them")
    records: dict[str, Any] = {"config": ConfigRecord({k: v for k, v in config.items() if v is not None})}
    _pack(records, "arrays", message.arrays)
    if message.channels is not None:
        _pack(records, "channels", {k: np.asarray(v, dtype=np.int32).reshape(-1) for k, v in message.channels.items()})
    return RecordDict(records)


def content_to_broadcast(content: RecordDict) -> tuple[Broadcast, dict[str, Any]]:
    """The Broadcast a client handler takes, plus the full config (request included)."""
    config = {k: (list(v) if isinstance(v, list) else v) for k, v in content.get("config", {}).items()}
    channels = ({k: tuple(int(i) for i in v) for k, v in _unpack(content, "channels").items()}
                if "channels" in content else None)
    arrays = _unpack(content, "arrays") if "arrays" in content else {}
    return Broadcast(arrays, config, channels), config


def reply_to_content(reply: _Reply | None) -> RecordDict:
    """One upward message (or ``None``: nothing to send) as a RecordDict."""
    if reply is None:
        return RecordDict({"reply": ConfigRecord({"kind": "none"})})
    if not isinstance(reply, UPWARD):
        raise TypeError(f"a client may only send {[t.__name__ for t in UPWARD]}, got {type(reply).__name__}")
    meta: dict[str, Any] = {"kind": reply.KIND}
    metrics = {**{k: float(v) for k, v in getattr(reply, "metrics", {}).items()}, COUNT_KEY: reply.num_samples}
    if isinstance(reply, ScoresMessage):
        layers = json.dumps({n: list(v) for n, v in reply.layers.items()})
        meta.update(method=reply.method, tag=reply.tag, layers=layers)
    records: dict[str, Any] = {"reply": ConfigRecord(meta), "metrics": MetricRecord(metrics)}
    _pack(records, "arrays", reply.tensors)
    return RecordDict(records)


def content_to_reply(content: RecordDict) -> _Reply | None:
    """Rebuild the library message (its checks run here, on the server); ``None`` for an empty reply. Records or
    ``reply`` keys its kind does not carry are refused, not dropped: nothing rides along next to what is read."""
    if "reply" not in content:
        raise TypeError(f"a client reply must carry a 'reply' record naming its kind; "
                        f"got records {short_repr(sorted(content))}")
    meta = dict(content["reply"])
    kind = meta.get("kind")
    if kind not in (*KINDS, "none"):
        raise TypeError(f"unknown client reply kind {short_repr(kind)}; allowed kinds are {[*KINDS, 'none']}")
    records = {"reply"} if kind == "none" else {"reply", "arrays", "arrays-layout", "metrics"}
    keys = {"kind", "method", "tag", "layers"} if kind == "scores" else {"kind"}
    extra = sorted(set(content) - records) or sorted(set(meta) - keys)
    if extra:
        raise ValueError(f"a {kind!r} reply has unexpected key {short_repr(extra[0])} "
                         f"(expected records {sorted(records)}, reply keys {sorted(keys)})")
    if kind == "none":
        return None
    missing = sorted(records - set(content)) or sorted(keys - set(meta))
    if missing:
        raise ValueError(f"a {kind!r} reply is missing key {missing[0]!r}")
    arrays = _unpack(content, "arrays")
    metrics = dict(content["metrics"])
    n = metrics.pop(COUNT_KEY, None)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"a {kind!r} reply must carry its sample count {COUNT_KEY!r} as an int, got {short_repr(n)}")
    if kind != "scores":
        return KINDS[kind](arrays, n, metrics)
    if metrics:
        raise ValueError(f"a 'scores' reply carries no metrics besides {COUNT_KEY!r}; "
                         f"got {short_repr(sorted(metrics)[0])}")
    layers = _json(meta["layers"], lambda v: isinstance(v, dict), MAX_LAYERS_JSON_CHARS)
    if layers is None:
        raise ValueError(f"ScoresMessage layers metadata must be JSON {{name: [out_channels, norm name or null, "
                         f"is_head]}} of at most {MAX_LAYERS_JSON_CHARS} characters, got {short_repr(meta['layers'])}")
    layers = {k: tuple(v) if isinstance(v, list) else v for k, v in layers.items()}  # the dataclass checks each
    return ScoresMessage(arrays, n, meta["method"], layers, meta["tag"])


# -- bytes ----------------------------------------------------------------------------------------------
def payload_bytes(content: RecordDict) -> int:
    """What the protocol moves: tensor bytes (+4 per index) and 8 per sample count."""
    arrays = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                 for r in content.values() if isinstance(r, ArrayRecord) for a in r.values())
    return arrays + sum(COUNT_BYTES for r in content.values() if isinstance(r, MetricRecord) and COUNT_KEY in r)


def wire_bytes(content: RecordDict) -> int:
    """Flower's own size of the records."""
    return int(sum(r.count_bytes() for r in content.values()))


@dataclass
class RoundBytes:
    """Bytes sent in one round: server -> clients (down) and clients -> server (up)."""

    down: int = 0
    up: int = 0

    @property
    def total(self) -> int:
        return self.down + self.up


@dataclass
class ByteCounter:
    """Payload and wire (Flower's own record size) bytes per round label (``fedavg/0``, ``score``, ...)."""

    payload: dict[str, RoundBytes] = field(default_factory=dict)
    wire: dict[str, RoundBytes] = field(default_factory=dict)

    def count(self, label: str, direction: str, payload: int, wire: int) -> None:
        """Book one message's bytes (``payload_bytes``, ``wire_bytes``), ``direction`` ``"down"`` or ``"up"``."""
        for book, n in ((self.payload, payload), (self.wire, wire)):
            b = book.setdefault(label, RoundBytes())
            setattr(b, direction, getattr(b, direction) + int(n))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {label: {"down": b.down, "up": b.up, "wire_down": self.wire[label].down, "wire_up": self.wire[label].up}
                for label, b in self.payload.items()}
