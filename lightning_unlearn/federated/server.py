"""Server side: count-weighted aggregation of parameters, scores and masked slices, pooled statistics. Each reply's
tensors are checked against the server's contract first (its metadata: :func:`~.messages.read_reply`)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_unlearn.federated.messages import Reply, short_repr
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.scoring.base import out_channels
from lightning_unlearn.scoring.channels import ChannelScores, average_scores
from lightning_unlearn.scoring.layers import NORM_TYPES, SCORED_TYPES, LayerInfo


def _who(replies: Sequence[Any], i: int) -> str:
    client = getattr(replies[i], "client", None)
    return f"client {client}" if client is not None else f"reply {i}"


def of_kind(replies: Sequence[Any], kind: str) -> list[Reply]:
    """``replies`` when each is a :class:`Reply` of ``kind``; a reply of another kind is refused."""
    replies = list(replies)
    for i, m in enumerate(replies):
        if not isinstance(m, Reply) or m.kind != kind:
            got = f"a {m.kind!r} reply" if isinstance(m, Reply) else type(m).__name__
            raise TypeError(f"{_who(replies, i)}: the server expects a {kind!r} reply here, got {got}")
    return replies


def check_arrays(
    arrays: Mapping[str, Tensor], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]], who: str,
    kind: str, describe: str, vector: tuple[str, str] | None = None,
) -> None:
    """Exactly the ``expected`` keys, each of its shape (and dtype, when given) with finite values; ``describe``
    words the whole (``"the 14 model arrays"``), ``vector`` a wrong 1-D length (``("values", "selected elements")``)."""
    what = f"{who}: a {kind!r} reply"
    for key in arrays:
        if key not in expected:
            raise ValueError(f"{what} has unexpected key {short_repr(key)} (expected {describe})")
    for key, (shape, dtype) in expected.items():
        if key not in arrays:
            raise ValueError(f"{what} is missing key {key!r} (expected {describe})")
        t = arrays[key]
        if tuple(t.shape) != tuple(shape):
            if vector is not None and t.dim() == 1:
                raise ValueError(f"{what} {key!r} has {t.numel()} {vector[0]} for {shape[0]} {vector[1]}")
            raise ValueError(f"{what} {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{what} {key!r} has dtype {t.dtype}, expected {dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} {key!r} holds non-finite values (NaN or inf)")


# -- aggregation ------------------------------------------------------------------------------------
def _average(messages: Sequence[Reply], contract: Mapping[str, tuple], describe: str,
             vector: tuple[str, str] | None = None) -> dict[str, Tensor]:
    """Each ``contract`` key's sample-count-weighted mean (in float64, cast back), once every reply keeps it."""
    for i, m in enumerate(messages):
        check_arrays(m.tensors, contract, _who(messages, i), m.kind, describe, vector)
    total = sum(m.num_samples for m in messages)
    if total <= 0:
        raise ValueError("no client reported any samples: nothing to aggregate")
    return {k: sum(m.num_samples / total * m.tensors[k].double() for m in messages).to(dtype)
            for k, (_, dtype) in contract.items()}


def fedavg_aggregate(messages: Sequence[Reply], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sample-count-weighted mean of the clients' arrays, each of the shape and dtype ``expected`` (the broadcast)."""
    contract = {k: (tuple(v.shape), v.dtype) for k, v in expected.items()}
    return _average(of_kind(messages, "parameters"), contract, f"the {len(contract)} model arrays")


def _check_layers_against_model(layers: Mapping[str, tuple], model: nn.Module, who: str) -> None:
    modules = dict(model.named_modules())
    scorable = {n: out_channels(m) for n, m in modules.items() if isinstance(m, SCORED_TYPES)}
    for name, (out, bn, _) in layers.items():
        if name not in scorable:
            raise ValueError(f"{who}: a 'scores' reply has unexpected layer {name!r} (expected scorable layers of "
                             f"{type(model).__name__}: {list(scorable)})")
        if out != scorable[name]:
            raise ValueError(f"{who}: a 'scores' reply layer {name!r} claims {out} channels; "
                             f"the model's has {scorable[name]}")
        norm = modules.get(bn)
        if bn is not None and (not isinstance(norm, NORM_TYPES)
                               or getattr(norm, "num_features", getattr(norm, "num_channels", -1)) != out):
            raise ValueError(f"{who}: a 'scores' reply layer {name!r} names {bn!r} as its norm layer, which is not a "
                             f"norm layer of {out} channels in the model")


def aggregate_scores(
    messages: Sequence[Reply], model: nn.Module | None = None, tag: str = "forget"
) -> ChannelScores:
    """Count-weighted mean of the clients' channel scores of document ``tag``: the score of the union of their
    forget sets (or, for CDP, of one document's samples)."""
    messages = of_kind(messages, "scores")
    if not messages:
        raise ValueError("no client holds data to forget: no scores to aggregate")
    methods = {m.method for m in messages}
    if len(methods) != 1:
        raise ValueError(f"clients scored with different methods {sorted(methods)}; all must use the same one")
    first = dict(messages[0].layers)
    if not first:
        raise ValueError(f"{_who(messages, 0)}: a 'scores' reply describes no layer (layers is empty)")
    if model is not None:  # a hostile first reply is caught against the server's model
        _check_layers_against_model(first, model, _who(messages, 0))
    contract = {n: ((out,), None) for n, (out, _, _) in first.items()}
    for i, m in enumerate(messages):
        who = _who(messages, i)
        if m.tag != tag:
            raise ValueError(f"{who}: a 'scores' reply tag {m.tag!r} in the scoring round (expected {tag!r})")
        if dict(m.layers) != first:
            diff = sorted(set(m.layers) ^ set(first)) or sorted(n for n in first if m.layers[n] != first[n])
            raise ValueError(f"{who}: a 'scores' reply layers differ from {_who(messages, 0)}'s "
                             f"at {short_repr(diff[0])}")
        check_arrays(m.tensors, contract, who, "scores", f"the {len(contract)} scored layers",
                     vector=("scores", "channels"))
    layers = {n: LayerInfo(n, out, bn, head) for n, (out, bn, head) in first.items()}
    scores = average_scores([({n: m.tensors[n] for n in first}, m.num_samples) for m in messages])
    return ChannelScores(scores, sum(m.num_samples for m in messages), methods.pop(), layers)


def masked_aggregate(
    reference: Mapping[str, Tensor], mask: ParameterMask, messages: Sequence[Reply]
) -> dict[str, Tensor]:
    """Average only the selected slices; every other element is copied from ``reference`` bit for bit (averaging
    identical copies is not exact in floating point)."""
    messages = of_kind(messages, "masked_update")
    out = {k: v.clone() for k, v in reference.items()}
    if not messages:
        return out
    selected = {name: m for name, m in mask.masks.items() if bool(m.any())}
    contract = {name: ((int(m.sum()),), reference[name].dtype) for name, m in selected.items()}
    mean = _average(messages, contract, f"the {len(contract)} masked parameters", ("values", "selected elements"))
    for name, m in selected.items():
        out[name][m] = mean[name]
    return out


# -- pooled moments: BatchNorm statistics of reset channels, head features of forgotten classes ---------------
def statistic_masks(channels: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{running statistic name: bool vector}`` of the selected BatchNorm channels (``channels``:
    :func:`~lightning_unlearn.reset.selected_batchnorm_channels`)."""
    return {f"{bn}.{s}" if bn else s: sel for bn, sel in channels.items() for s in ("running_mean", "running_var")}


def _counts(m: Reply, contract: Mapping[str, tuple], who: str, describe: str) -> dict[str, float]:
    """Each key's count, once its (count, sum, sum of squares) rows keep ``contract`` and are the moments of real
    values: one whole count >= 0 in every column, n x squares >= sum^2, nothing summed over no values."""
    check_arrays(m.tensors, contract, who, "bn_stats", describe)
    for key in contract:
        count, total, squares = m.tensors[key]
        n = float(count[0])
        if not bool((count == count[0]).all()) or n != math.floor(n) or n < 0:
            raise ValueError(f"{who}: a 'bn_stats' reply {key!r} count row must be one whole number >= 0 shared "
                             f"by every column, got {short_repr(count.tolist())}")
        if bool((squares * n - total * total < -1e-9 * (squares * n) - 1e-12).any()) or (n == 0 and squares.any()):
            raise ValueError(f"{who}: a 'bn_stats' reply {key!r} sums of squares are below sum^2 / count (or not 0 "
                             "for no values): not the moments of real values")
    return {key: float(m.tensors[key][0, 0]) for key in contract}


def pool_batchnorm_moments(
    messages: Sequence[Reply], channels: Mapping[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """BatchNorm name -> (mean, unbiased variance) of its selected channels' input over all clients' values."""
    messages = of_kind(messages, "bn_stats")
    if not messages:
        raise ValueError("no client has retain data: no BatchNorm statistics to pool")
    contract = {bn: ((3, int(sel.sum())), torch.float64) for bn, sel in channels.items()}
    for i, m in enumerate(messages):
        who = _who(messages, i)
        for bn, n in _counts(m, contract, who, f"the {len(contract)} selected BatchNorm layers").items():
            if (n > 0) != (m.num_samples > 0):
                raise ValueError(f"{who}: a 'bn_stats' reply {bn!r} counts {int(n)} values "
                                 f"from {m.num_samples} samples")
    pooled = {}
    for bn in channels:
        count, total, squares = sum(m.tensors[bn] for m in messages)
        n = float(count[0])
        if n < 2:
            raise ValueError(f"BatchNorm {bn!r}: the clients sent {n:g} values; the variance needs at least 2")
        mean = total / n
        pooled[bn] = (mean, ((squares - total * mean) / (n - 1)).clamp(min=0.0))
    return pooled


def head_feature_key(c: int) -> str:
    """The key of class ``c``'s head-feature moments in a ``bn_stats`` reply (head calibration)."""
    return f"class_{int(c)}"


def pool_head_features(
    messages: Sequence[Reply], classes: Sequence[int], features: int
) -> dict[int, Tensor]:
    """Class -> mean head input over the clients' forget samples of that class (classes no client holds are left
    out). Each reply holds a float64 ``(3, features)`` moments tensor per class, the counts summing to its samples."""
    messages = of_kind(messages, "bn_stats")
    contract = {head_feature_key(c): ((3, int(features)), torch.float64) for c in classes}
    for i, m in enumerate(messages):
        who = _who(messages, i)
        counted = int(sum(_counts(m, contract, who, f"the {len(contract)} forgotten classes").values()))
        if counted != m.num_samples:
            raise ValueError(f"{who}: head features count {counted} values from {m.num_samples} samples")
    pooled = {}
    for c in classes:
        count, total, _ = sum((m.tensors[head_feature_key(c)] for m in messages),
                              torch.zeros(3, int(features), dtype=torch.float64))
        if float(count[0]) > 0:
            pooled[int(c)] = (total / float(count[0])).float()
    return pooled


# -- FedAvg -----------------------------------------------------------------------------------------------
def check_rounds(rounds: int, name: str = "rounds") -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {rounds!r}")


def check_fraction(fraction: float, name: str = "fraction") -> None:
    """A share of clients per round: a number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")


def sample_clients(pool: Sequence[int], fraction: float, seed: int, r: int) -> np.ndarray:
    """Round ``r``'s clients (sorted): a seeded draw of ``round(fraction * len(pool))``, at least one; FedAvg
    and the masked rounds share it, so a sampled run draws the same clients in every phase."""
    pool = np.asarray(sorted(pool), dtype=np.int64)
    picked = np.random.default_rng(seed * 100_003 + r).choice(pool, max(1, round(fraction * len(pool))), replace=False)
    return np.sort(picked)
