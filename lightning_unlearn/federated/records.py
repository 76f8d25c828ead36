"""Library messages <-> Flower records, and the bytes they cost.

Down: a :class:`~lightning_unlearn.federated.messages.Broadcast` becomes a ``RecordDict``
(``arrays``, ``config``, and ``channels`` as int32 indices when the mask travels). Up: each
client message becomes a ``RecordDict`` tagged with its kind, and the server rebuilds the
dataclass from it (refusing records or keys the kind does not carry), so the dataclasses' own
checks and the aggregation functions' contract guard every reply, on every grid.

Inside a message, the named tensors of a record travel *packed*: one ``uint8`` Array holding
every tensor's bytes one after the other, and a ``<record>-layout`` ConfigRecord (JSON: name,
numpy dtype, shape per tensor) to cut them apart again. Flower moves every Array (and every
chunk of it) as an object of its own, one HTTP request per object and hop (ServerApp ->
SuperLink -> SuperNode -> ClientApp and back): SmallCNN's 16 tensors were 27 objects a message,
packed they are 7. In-memory records (a strategy's ``ArrayRecord``, a node's ``context.state``)
stay one Array per tensor (:func:`arrays_to_record`).

Two byte counts per message: ``payload`` is what the protocol moves (tensor bytes, 4 per channel index,
8 per sample count: the dataclasses' ``nbytes``); ``wire`` is Flower's own record size (numpy headers, keys,
config and metric entries).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from lightning_unlearn.federated.messages import (
    BatchNormStatsMessage,
    Broadcast,
    MaskedUpdateMessage,
    ParametersMessage,
    RoundBytes,
    ScoresMessage,
    short_repr,
)

COUNT_KEY = "num-examples"  # Flower's conventional sample-count key
COUNT_BYTES = 8  # the in-process transport counts a sample count as 8 bytes
REPLY_KINDS = ("parameters", "masked_update", "scores", "bn_stats", "none")
UpwardMessage = ParametersMessage | MaskedUpdateMessage | ScoresMessage | BatchNormStatsMessage
MAX_LAYERS_JSON_CHARS = 65_536  # layer table of a ScoresMessage: ~45 characters a layer


# -- tensors ---------------------------------------------------------------------------------------
def arrays_to_record(arrays: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord (order kept: FedAvg relies on it only through names)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def channels_to_record(channels: Mapping[str, Sequence[int]]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.int32).reshape(-1)) for k, v in channels.items()})


def record_to_channels(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(i) for i in v.numpy()) for k, v in record.items()}


# -- packed tensors (inside messages) ----------------------------------------------------------------
PACKED_KEY = "packed"
LAYOUT_SUFFIX = "-layout"
PACKED_DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1")
MAX_LAYOUT_CHARS = 1 << 20  # ~40 characters a tensor


def pack(content: dict, key: str, arrays: Mapping[str, Any]) -> None:
    """Put ``arrays`` (tensors or numpy arrays) into ``content`` as ``key`` (one uint8 Array) + ``key-layout``."""
    parts = [np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, Tensor) else v) for v in arrays.values()]
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in zip(arrays, parts)]
    blob = np.frombuffer(b"".join(a.tobytes() for a in parts), dtype=np.uint8)
    content[key] = ArrayRecord({PACKED_KEY: Array(blob)})
    content[key + LAYOUT_SUFFIX] = ConfigRecord({"layout": json.dumps(layout)})


def unpack(content: RecordDict, key: str) -> dict[str, np.ndarray]:
    """The named arrays under ``key``: those :func:`pack` packed, plus any Array stored by name (unpacked).

    Unpacked Arrays are decoded as they are, so that the receiver's contract (the dataclass checks, the
    aggregation's expected keys) refuses what does not belong, the same as for any other reply. A
    layout that does not fit the packed bytes is a one-line ValueError.
    """
    record, meta = content[key], content.get(key + LAYOUT_SUFFIX)
    out = {k: a.numpy() for k, a in record.items() if k != PACKED_KEY}
    if PACKED_KEY not in record:
        return out
    text = dict(meta).get("layout") if meta is not None else None
    try:
        layout = json.loads(text) if isinstance(text, str) and len(text) <= MAX_LAYOUT_CHARS else None
    except ValueError:
        layout = None
    ok = isinstance(layout, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in PACKED_DTYPES
        and isinstance(e[2], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e[2])
        for e in layout)
    if not ok or len({e[0] for e in layout}) != len(layout) or {e[0] for e in layout} & set(out):
        raise ValueError(f"record {key!r}: {key + LAYOUT_SUFFIX!r} must hold a 'layout', JSON [[name, dtype in "
                         f"{list(PACKED_DTYPES)}, shape], ...] with unique names, at most {MAX_LAYOUT_CHARS} "
                         f"characters; got {short_repr(text)}")
    blob = record[PACKED_KEY].numpy()
    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, dtype, shape in layout]
    if blob.dtype != np.uint8 or blob.ndim != 1 or sum(sizes) != blob.size:
        raise ValueError(f"record {key!r}: the layout describes {sum(sizes)} bytes, the packed array holds "
                         f"{blob.size} ({blob.dtype}, {blob.ndim}-D; expected uint8, 1-D)")
    offset = 0
    for (name, dtype, shape), size in zip(layout, sizes):
        out[name] = np.frombuffer(blob, dtype=np.dtype(dtype), count=size // np.dtype(dtype).itemsize,
                                  offset=offset).reshape(shape)
        offset += size
    return out


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


# -- config ------------------------------------------------------------------------------------------
def to_config(values: Mapping[str, Any]) -> ConfigRecord:
    """A config mapping as a ConfigRecord; ``None`` entries are dropped (clients read them with ``.get``)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if v is None:
            continue
        if isinstance(v, tuple):
            v = list(v)
        ok = (int, float, str, bool, bytes)
        if not (isinstance(v, ok) or (isinstance(v, list) and v and all(isinstance(i, type(v[0])) for i in v)
                                      and isinstance(v[0], ok))):
            raise TypeError(f"config[{k!r}] = {v!r} cannot travel in a Flower ConfigRecord; "
                            "allowed: int, float, str, bool, bytes or a non-empty list of one of them")
        out[k] = v
    return ConfigRecord(out)


def from_config(record: ConfigRecord) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}


# -- server -> client ----------------------------------------------------------------------------------
def broadcast_to_content(message: Broadcast, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """``extra`` (e.g. the forget request) joins the config: settings, not payload."""
    records: dict[str, Any] = {"config": to_config({**message.config, **(extra or {})})}
    pack(records, "arrays", message.arrays)
    if message.channels is not None:
        pack(records, "channels", {k: np.asarray(v, dtype=np.int32).reshape(-1) for k, v in message.channels.items()})
    return RecordDict(records)


def content_to_broadcast(content: RecordDict) -> tuple[Broadcast, dict[str, Any]]:
    """The Broadcast a client handler takes, plus the full config (request included)."""
    config = from_config(content["config"]) if "config" in content else {}
    channels = ({k: tuple(int(i) for i in v) for k, v in unpack(content, "channels").items()}
                if "channels" in content else None)
    arrays = _tensors(unpack(content, "arrays")) if "arrays" in content else {}
    return Broadcast(arrays, config, channels), config


# -- client -> server ------------------------------------------------------------------------------------
def reply_to_content(reply: UpwardMessage | None) -> RecordDict:
    """One upward message (or ``None``: nothing to send) as a RecordDict."""
    if reply is None:
        return RecordDict({"reply": ConfigRecord({"kind": "none"})})
    metrics = MetricRecord({**{k: float(v) for k, v in reply.metrics.items()}, COUNT_KEY: reply.num_samples}
                           if not isinstance(reply, ScoresMessage) else {COUNT_KEY: reply.num_samples})
    kinds = ((ParametersMessage, "parameters", "arrays"), (MaskedUpdateMessage, "masked_update", "values"),
             (BatchNormStatsMessage, "bn_stats", "moments"), (ScoresMessage, "scores", "scores"))
    for cls, kind, field_ in kinds:
        if isinstance(reply, cls):
            meta: dict[str, Any] = {"kind": kind}
            if isinstance(reply, ScoresMessage):
                meta.update(method=reply.method, tag=reply.tag,
                            layers=json.dumps({n: list(v) for n, v in reply.layers.items()}))
            records: dict[str, Any] = {"reply": ConfigRecord(meta), "metrics": metrics}
            pack(records, "arrays", getattr(reply, field_))
            return RecordDict(records)
    raise TypeError(f"a client may only send {[t.__name__ for t in UpwardMessage.__args__]}, got {type(reply).__name__}")


#: The records and ``reply`` config keys each reply kind carries: anything more is refused, not dropped.
_WITH_ARRAYS = {"reply", "arrays", "arrays" + LAYOUT_SUFFIX, "metrics"}
_REPLY_RECORDS = {"none": {"reply"}, "parameters": _WITH_ARRAYS, "masked_update": _WITH_ARRAYS, "scores": _WITH_ARRAYS,
                  "bn_stats": _WITH_ARRAYS}
_REPLY_META = {"none": {"kind"}, "parameters": {"kind"}, "masked_update": {"kind"}, "bn_stats": {"kind"},
               "scores": {"kind", "method", "tag", "layers"}}


def _layers_from_json(text: Any) -> dict[str, tuple[int, str | None, bool]]:
    """``{name: [out_channels, norm name or null, is_head]}`` as ScoresMessage metadata, or a one-line ValueError."""
    try:
        raw = json.loads(text) if isinstance(text, str) and len(text) <= MAX_LAYERS_JSON_CHARS else None
        ok = isinstance(raw, dict) and all(
            isinstance(v, list) and len(v) == 3 and isinstance(v[0], int) and not isinstance(v[0], bool)
            and (v[1] is None or isinstance(v[1], str)) and isinstance(v[2], bool) for v in raw.values())
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"ScoresMessage layers metadata must be JSON {{name: [out_channels, norm name or null, "
                         f"is_head]}} of at most {MAX_LAYERS_JSON_CHARS} characters, got {short_repr(text)}")
    return {k: (v[0], v[1], v[2]) for k, v in raw.items()}


def content_to_reply(content: RecordDict) -> UpwardMessage | None:
    """Rebuild the library message (its checks run here, on the server); ``None`` for an empty reply.

    Records or ``reply`` keys a kind does not carry are refused: a client cannot smuggle an extra
    record past the dataclass by putting it next to the ones the server reads.
    """
    if "reply" not in content:
        raise TypeError(f"a client reply must carry a 'reply' record naming its kind; got records {sorted(content)}")
    meta = dict(content["reply"])
    kind = meta.get("kind")
    if kind not in REPLY_KINDS:
        raise TypeError(f"unknown client reply kind {short_repr(kind)}; allowed kinds are {list(REPLY_KINDS)}")
    extra = sorted(set(content) - _REPLY_RECORDS[kind]) or sorted(set(meta) - _REPLY_META[kind])
    if extra:
        raise ValueError(f"a {kind!r} reply has unexpected key {short_repr(extra[0])} "
                         f"(expected records {sorted(_REPLY_RECORDS[kind])}, reply keys {sorted(_REPLY_META[kind])})")
    if kind == "none":
        return None
    missing = sorted(_REPLY_RECORDS[kind] - set(content)) or sorted(_REPLY_META[kind] - set(meta))
    if missing:
        raise ValueError(f"a {kind!r} reply is missing key {missing[0]!r}")
    arrays = _tensors(unpack(content, "arrays"))
    metrics = dict(content["metrics"])
    n = metrics.pop(COUNT_KEY, None)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"a {kind!r} reply must carry its sample count {COUNT_KEY!r} as an int, got {short_repr(n)}")
    if kind == "parameters":
        return ParametersMessage(arrays, n, metrics)
    if kind == "masked_update":
        return MaskedUpdateMessage(arrays, n, metrics)
    if kind == "bn_stats":
        return BatchNormStatsMessage(arrays, n, metrics)
    if metrics:
        raise ValueError(f"a 'scores' reply carries no metrics besides {COUNT_KEY!r}; got {short_repr(sorted(metrics)[0])}")
    return ScoresMessage(arrays, n, meta["method"], _layers_from_json(meta["layers"]), meta["tag"])


# -- bytes ------------------------------------------------------------------------------------------------
def payload_bytes(content: RecordDict) -> int:
    """What the in-process transport would count: tensor bytes (+4 per index) and 8 per sample count."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values())
        elif isinstance(record, MetricRecord) and COUNT_KEY in record:
            total += COUNT_BYTES
    return total


def wire_bytes(content: RecordDict) -> int:
    """Flower's own size of the records (serialised arrays with headers, keys, config and metrics)."""
    return int(sum(r.count_bytes() for r in content.values()))


@dataclass
class ByteCounter:
    """Bytes per round label (``fedavg/0``, ``deploy``, ``score``, ``unlearn/0``, ...), counted on the server."""

    payload: dict[str, RoundBytes] = field(default_factory=dict)
    wire: dict[str, RoundBytes] = field(default_factory=dict)

    def down(self, label: str, content: RecordDict) -> None:
        self.payload.setdefault(label, RoundBytes()).down += payload_bytes(content)
        self.wire.setdefault(label, RoundBytes()).down += wire_bytes(content)

    def up(self, label: str, content: RecordDict) -> None:
        self.payload.setdefault(label, RoundBytes()).up += payload_bytes(content)
        self.wire.setdefault(label, RoundBytes()).up += wire_bytes(content)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {label: {"down": b.down, "up": b.up, "wire_down": self.wire[label].down, "wire_up": self.wire[label].up}
                for label, b in self.payload.items()}
