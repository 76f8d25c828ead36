"""What crosses the client/server boundary: Flower records built by :func:`down` and :func:`up`; :func:`read_reply`
checks a reply's keys and metadata, the aggregation in :mod:`.server` its tensors. Tensors travel packed (one uint8
Array per record plus a JSON layout: with one Array per tensor the deployment test took 45 s instead of 17 s)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

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
MAX_NAME_CHARS = 256  # parameter and layer names (module paths)
MAX_LAYERS_JSON_CHARS = 65_536  # the layer table of a scores reply: ~45 characters a layer
MAX_LAYOUT_CHARS = 1 << 20  # a packed record's layout: ~40 characters a tensor
PACKED_DTYPES = ("<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "|b1")
CDP_METHOD = "cdp_activation"  # CDP's statistic (mean activation per channel), not a scoring method
TAG_PATTERN = re.compile(r"forget|class_\d{1,9}")  # what was scored: the forget set or one retained class
#: Reply kinds: model arrays, a masked round's selected elements, channel scores, moments, evaluation metrics.
KINDS = ("parameters", "masked_update", "scores", "bn_stats", "evaluation")


def tensor_bytes(arrays: Mapping[str, Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error message must not echo a smuggled dump."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


@dataclass(frozen=True)
class Reply:
    """A client's reply as the server read it: named float ``tensors`` and the ``num_samples`` behind them; a
    ``scores`` reply also names its ``method``, ``tag`` (``"forget"`` or a CDP document such as ``"class_3"``) and
    ``layers`` (name -> (out_channels, BatchNorm name, is_head)); ``client``: the sender's id, when known."""

    kind: str
    tensors: Mapping[str, Tensor]
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    method: str = ""
    tag: str = "forget"
    layers: Mapping[str, tuple[int, str | None, bool]] = field(default_factory=dict)
    client: int | None = None


# -- the records --------------------------------------------------------------------------------------------
def _pack(records: dict[str, Any], key: str, tensors: Mapping[str, Tensor]) -> None:
    """``tensors`` as record ``key`` (one uint8 Array) plus ``key-layout`` (``[[name, dtype, shape], ...]``)."""
    parts = [torch.as_tensor(t).detach().cpu().numpy() for t in tensors.values()]
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in zip(tensors, parts)]
    records[key] = ArrayRecord({"packed": Array(np.frombuffer(b"".join(a.tobytes() for a in parts), dtype=np.uint8))})
    records[key + "-layout"] = ConfigRecord({"layout": json.dumps(layout)})


def _json(text: Any, limit: int) -> Any:
    """``text`` parsed, if it is JSON of at most ``limit`` characters; else None."""
    try:
        return json.loads(text) if isinstance(text, str) and len(text) <= limit else None
    except ValueError:
        return None


def _unpack(content: RecordDict, key: str, what: str) -> dict[str, Tensor]:
    """The tensors :func:`_pack` packed under ``key``; an Array beside the packed one or a layout that does not fit
    the packed bytes is a one-line ValueError."""
    if list(content[key]) != ["packed"]:
        raise ValueError(f"{what} {key!r} must hold one array, 'packed'; got {short_repr(sorted(content[key]))}")
    text = content.config_records.get(key + "-layout", {}).get("layout")
    layout = _json(text, MAX_LAYOUT_CHARS)
    if not (isinstance(layout, list) and all(  # [name, dtype, shape] entries with unique names
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in PACKED_DTYPES
            and isinstance(e[2], list) and all(type(d) is int and d >= 0 for d in e[2]) for e in layout)
            and len({e[0] for e in layout}) == len(layout)):
        raise ValueError(f"{what} {key + '-layout'!r} must be JSON [[name, dtype in {list(PACKED_DTYPES)}, "
                         f"shape], ...] with unique names, at most {MAX_LAYOUT_CHARS} characters; "
                         f"got {short_repr(text)}")
    blob = content[key]["packed"].numpy()
    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, dtype, shape in layout]
    if blob.dtype != np.uint8 or blob.ndim != 1 or sum(sizes) != blob.size:
        raise ValueError(f"{what} {key!r}: the layout describes {sum(sizes)} bytes, the packed array holds "
                         f"{blob.size} ({blob.dtype}, {blob.ndim}-D; expected uint8, 1-D)")
    out = {}
    for (name, dtype, shape), size, offset in zip(layout, sizes, np.cumsum([0, *sizes])):
        data = np.frombuffer(blob, dtype, size // np.dtype(dtype).itemsize, int(offset)).reshape(shape)
        out[name] = torch.from_numpy(data.copy())
    return out


def down(arrays: Mapping[str, Tensor], config: Mapping[str, Any] | None = None,
         channels: Mapping[str, Sequence[int]] | None = None) -> RecordDict:
    """Server -> client: full model arrays (FedAvg) or the selected slices (masked rounds), the round's settings
    (``None`` entries dropped: clients read them with ``.get``) and, with a client's first masked round, the mask."""
    records: dict[str, Any] = {}
    _pack(records, "arrays", arrays)
    if channels is not None:
        _pack(records, "channels", {k: torch.tensor(v, dtype=torch.int32) for k, v in channels.items()})
    return with_config(RecordDict(records), config)


def with_config(content: RecordDict, config: Mapping[str, Any] | None) -> RecordDict:
    """``content`` (a :func:`down`) with other settings: the arrays are packed once for every client of a round."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in (config or {}).items() if v is not None}
    return RecordDict({"config": ConfigRecord(config), **{k: content[k] for k in content if k != "config"}})


def read_down(content: RecordDict) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, tuple[int, ...]] | None]:
    """A client's reading of :func:`down`: the arrays, the config (request included) and the mask's channels."""
    config = {k: (list(v) if isinstance(v, list) else v) for k, v in content.get("config", {}).items()}
    channels = content.get("channels")
    if channels is not None:
        channels = {k: tuple(int(i) for i in v) for k, v in _unpack(content, "channels", "the server's").items()}
    return _unpack(content, "arrays", "the server's") if "arrays" in content else {}, config, channels


def up(kind: str | None, tensors: Mapping[str, Tensor] | None = None, num_samples: int = 0,
       metrics: Mapping[str, float] | None = None, **meta: Any) -> RecordDict:
    """Client -> server: a ``kind`` reply of named float ``tensors`` over ``num_samples`` samples (``None``: nothing
    to send); a ``scores`` reply adds ``method``, ``tag`` and ``layers`` (see :class:`Reply`) in ``meta``."""
    if kind is None:
        return RecordDict({"reply": ConfigRecord({"kind": "none"})})
    if "layers" in meta:
        meta["layers"] = json.dumps({n: list(v) for n, v in meta["layers"].items()})
    counted = {**{k: float(v) for k, v in (metrics or {}).items()}, COUNT_KEY: num_samples}
    records: dict[str, Any] = {"reply": ConfigRecord({"kind": kind, **meta}), "metrics": MetricRecord(counted)}
    _pack(records, "arrays", tensors or {})
    return RecordDict(records)


def check_metrics(metrics: Mapping[str, Any], who: str, kind: str) -> None:
    """Keys from :data:`METRIC_KEYS` (which also bounds their number), finite scalar values."""
    for key, value in metrics.items():
        if key not in METRIC_KEYS:
            raise ValueError(f"{who}: {kind} has unexpected metric {short_repr(key)} "
                             f"(allowed: {', '.join(sorted(METRIC_KEYS))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{who}: {kind} metric {key!r} must be a finite scalar, got {short_repr(value)}")


def _check_scores_meta(meta: Mapping[str, Any], who: str) -> dict[str, tuple[int, str | None, bool]]:
    """A scores reply's method, tag and layer table (JSON ``{name: [out_channels, norm name or null, is_head]}``)."""
    from lightning_unlearn.scoring.base import registry_views  # the live registry: user-registered methods count

    what = f"{who}: a 'scores' reply"
    methods = (*registry_views()["SCORING_METHODS"], CDP_METHOD)
    texts = {"method": (", ".join(methods), lambda v: v in methods),
             "tag": ("'forget' or 'class_<int>'", TAG_PATTERN.fullmatch)}
    for name, (allowed, ok) in texts.items():  # a known value is also a short one
        if not isinstance(meta[name], str) or not ok(meta[name]):
            raise ValueError(f"{what} has unknown {name} {short_repr(meta[name])} (allowed: {allowed})")
    text = meta["layers"]
    layers = _json(text, MAX_LAYERS_JSON_CHARS)
    if not isinstance(layers, dict):
        raise ValueError(f"{what} layers metadata must be JSON {{name: [out_channels, norm name or null, is_head]}} "
                         f"of at most {MAX_LAYERS_JSON_CHARS} characters, got {short_repr(text)}")
    for name, triple in layers.items():
        if not (isinstance(triple, list) and len(triple) == 3 and type(triple[0]) is int and isinstance(triple[2], bool)
                and (triple[1] is None or isinstance(triple[1], str))
                and max(len(name), len(triple[1] or "")) <= MAX_NAME_CHARS):
            raise TypeError(f"{what} layers[{short_repr(name)}] must be (int, str | None, bool) naming modules of at "
                            f"most {MAX_NAME_CHARS} characters, got {short_repr(triple)}")
    return {name: tuple(triple) for name, triple in layers.items()}


def read_reply(content: RecordDict, client: int | None = None) -> Reply | None:
    """The server's reading of one reply of ``client`` (``None``: nothing to send), at the trust boundary: records
    or ``reply`` keys its kind does not carry are refused, not dropped; metrics, the count, the tensors' dtype and a
    scores reply's method, tag and layer table are checked. Errors are one line naming the client and the key."""
    who = f"client {client}" if client is not None else "a client"
    meta = content.config_records.get("reply")
    kind = meta.get("kind") if meta is not None else None
    if kind not in (*KINDS, "none"):
        raise TypeError(f"{who}: a reply's 'reply' record must name its kind, one of {[*KINDS, 'none']}; got "
                        f"{short_repr(kind)} (records {short_repr(sorted(content))})")
    what = f"{who}: a {kind!r} reply"
    records = {"reply"} if kind == "none" else {"reply", "arrays", "arrays-layout", "metrics"}
    keys = {"kind", "method", "tag", "layers"} if kind == "scores" else {"kind"}
    extra = sorted(set(content) - records) or sorted(set(meta) - keys)
    if extra:
        raise ValueError(f"{what} has unexpected key {short_repr(extra[0])} "
                         f"(expected records {sorted(records)}, reply keys {sorted(keys)})")
    if kind == "none":
        return None
    arrays, metrics = content.array_records.get("arrays"), content.metric_records.get("metrics")
    missing = sorted(keys - set(meta)) or [k for k, r in (("arrays", arrays), ("metrics", metrics)) if r is None]
    if missing:
        raise ValueError(f"{what} is missing key {missing[0]!r}")
    tensors = _unpack(content, "arrays", what)
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{what} {short_repr(name)} must be a float tensor (parameters, scores or moments), "
                            f"got {t.dtype}")
    metrics = dict(metrics)
    n = metrics.pop(COUNT_KEY, None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must carry its sample count {COUNT_KEY!r} as an int >= 0, got {short_repr(n)}")
    if kind != "scores":
        check_metrics(metrics, who, f"a {kind!r} reply")
        return Reply(kind, tensors, n, metrics, client=client)
    if metrics:
        raise ValueError(f"{what} carries no metrics besides {COUNT_KEY!r}; got {short_repr(sorted(metrics)[0])}")
    layers = _check_scores_meta(meta, who)
    return Reply(kind, tensors, n, method=meta["method"], tag=meta["tag"], layers=layers, client=client)


# -- bytes ----------------------------------------------------------------------------------------------
def payload_bytes(content: RecordDict) -> int:
    """What the protocol moves: tensor bytes (+4 per index) and 8 per sample count."""
    arrays = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                 for r in content.values() if isinstance(r, ArrayRecord) for a in r.values())
    return arrays + sum(COUNT_BYTES for r in content.values() if isinstance(r, MetricRecord) and COUNT_KEY in r)


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
        """Book one message's payload and wire bytes, ``direction`` ``"down"`` or ``"up"``."""
        for book, n in ((self.payload, payload), (self.wire, wire)):
            b = book.setdefault(label, RoundBytes())
            setattr(b, direction, getattr(b, direction) + int(n))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {label: {"down": b.down, "up": b.up, "wire_down": self.wire[label].down, "wire_up": self.wire[label].up}
                for label, b in self.payload.items()}
