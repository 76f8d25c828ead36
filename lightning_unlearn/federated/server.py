"""Server side: FedAvg rounds, count-weighted aggregation of parameters, scores and masked slices.

Nothing here touches a dataset. Every aggregation function checks each reply against its
contract (:mod:`~lightning_unlearn.federated.messages`): the message type, exactly the keys
the server expects with their shapes (the broadcast arrays, the masked parameters' selected
counts, the scored layers' channels), bounded metadata; a violation is a one-line ValueError
naming the client and the key. The round loop talks to clients only through a
:class:`~lightning_unlearn.federated.messages.Transport`.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.scoring.layers import NORM_TYPES, SCORED_TYPES, LayerInfo
from lightning_unlearn.scoring.channels import ChannelScores, average_scores
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.federated.messages import (
    BatchNormStatsMessage,
    Broadcast,
    MaskedUpdateMessage,
    ParametersMessage,
    ScoresMessage,
    Transport,
    check_arrays,
    check_upward,
    sender_label,
    short_repr,
    tensor_bytes,
)
from lightning_unlearn.scoring.base import out_channels
from lightning_unlearn.mask import ParameterMask


# -- aggregation ------------------------------------------------------------------------------------
def _weights(messages: Sequence[Any]) -> list[float]:
    total = sum(m.num_samples for m in messages)
    if total <= 0:
        raise ValueError("no client reported any samples: nothing to aggregate")
    return [m.num_samples / total for m in messages]


def fedavg_aggregate(
    messages: Sequence[ParametersMessage],
    expected: Mapping[str, Tensor] | None = None,
    senders: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Sample-count-weighted mean of the clients' arrays (computed in float64, cast back).

    Every reply must hold exactly the keys of ``expected`` (the arrays the server broadcast), each of
    its shape and dtype; without ``expected``, those of the first reply. ``senders`` (client ids,
    one per message) name the client in the one-line ValueError.
    """
    messages = check_upward(messages, (ParametersMessage,), senders)
    if not messages:
        raise ValueError("fedavg_aggregate needs at least one client message")
    reference = expected if expected is not None else messages[0].arrays
    contract = {k: (tuple(v.shape), v.dtype) for k, v in reference.items()}
    describe = f"the {len(contract)} model arrays" if expected is not None else f"the {len(contract)} arrays of reply 0"
    for i, m in enumerate(messages):
        check_arrays(m.arrays, contract, sender_label(senders, i), "ParametersMessage", describe)
    w = _weights(messages)
    return {k: sum(wi * m.arrays[k].double() for wi, m in zip(w, messages)).to(dtype) for k, (_, dtype) in contract.items()}


def _model_layers(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Scorable layers -> out_channels, and norm layers -> channels, from the module tree alone (no data)."""
    layers, norms = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, SCORED_TYPES):
            layers[name] = out_channels(module)
        elif isinstance(module, NORM_TYPES):
            norms[name] = int(getattr(module, "num_features", getattr(module, "num_channels", -1)))
    return layers, norms


def _check_layers_against_model(layers: Mapping[str, tuple], model: nn.Module, who: str) -> None:
    scorable, norms = _model_layers(model)
    for name, (out, bn, _) in layers.items():
        if name not in scorable:
            raise ValueError(f"{who}: ScoresMessage has unexpected layer {name!r} (expected scorable layers of "
                             f"{type(model).__name__}: {list(scorable)})")
        if out != scorable[name]:
            raise ValueError(f"{who}: ScoresMessage layer {name!r} claims {out} channels; the model's has {scorable[name]}")
        if bn is not None and norms.get(bn) != out:
            raise ValueError(f"{who}: ScoresMessage layer {name!r} names {bn!r} as its norm layer, which is not a "
                             f"norm layer of {out} channels in the model")


def aggregate_scores(
    messages: Sequence[ScoresMessage], senders: Sequence[int] | None = None, model: nn.Module | None = None
) -> ChannelScores:
    """Count-weighted mean of the clients' channel scores: the score of the union of their forget sets.

    Every reply must score the forget set (tag ``"forget"``) with one method, describe the same
    layers, and send exactly one 1-D vector of ``out_channels`` scores per described layer. With
    ``model`` (the server's copy), each layer must be a scorable layer of it with that many channels.
    """
    messages = check_upward(messages, (ScoresMessage,), senders)
    if not messages:
        raise ValueError("no client holds data to forget: no scores to aggregate")
    methods = {m.method for m in messages}
    if len(methods) != 1:
        raise ValueError(f"clients scored with different methods {sorted(methods)}; all must use the same one")
    first = dict(messages[0].layers)
    if not first:
        raise ValueError(f"{sender_label(senders, 0)}: ScoresMessage describes no layer (layers is empty)")
    if model is not None:
        _check_layers_against_model(first, model, sender_label(senders, 0))
    contract = {n: ((out,), None) for n, (out, _, _) in first.items()}
    for i, m in enumerate(messages):
        who = sender_label(senders, i)
        if m.tag != "forget":
            raise ValueError(f"{who}: ScoresMessage tag {m.tag!r} in the scoring round (expected 'forget')")
        if dict(m.layers) != first:
            diff = sorted(set(m.layers) ^ set(first)) or sorted(n for n in first if m.layers[n] != first[n])
            raise ValueError(f"{who}: ScoresMessage layers differ from {sender_label(senders, 0)}'s at {short_repr(diff[0])}")
        check_arrays(m.scores, contract, who, "ScoresMessage", f"the {len(contract)} scored layers",
                     vector=("scores", "channels"))
    layers = {n: LayerInfo(n, out, bn, head) for n, (out, bn, head) in first.items()}
    scores = average_scores([({n: m.scores[n] for n in first}, m.num_samples) for m in messages])
    return ChannelScores(scores, sum(m.num_samples for m in messages), methods.pop(), layers)


def masked_aggregate(
    reference: Mapping[str, Tensor],
    mask: ParameterMask,
    messages: Sequence[MaskedUpdateMessage],
    senders: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Average only the selected slices; every other element is copied from ``reference`` bit for bit.

    Plain averaging of identical copies is not exact in floating point (the issue measured 13,003
    of 33,194 values changed), so frozen values are never averaged at all. Every reply must hold
    exactly the masked parameters, each a 1-D vector of ``mask.masks[name].sum()`` values.
    """
    messages = check_upward(messages, (MaskedUpdateMessage,), senders)
    out = {k: v.clone() for k, v in reference.items()}
    if not messages:
        return out
    selected = {name: m for name, m in mask.masks.items() if bool(m.any())}
    contract = {name: ((int(m.sum()),), reference[name].dtype) for name, m in selected.items()}
    for i, msg in enumerate(messages):
        check_arrays(msg.values, contract, sender_label(senders, i), "MaskedUpdateMessage",
                     f"the {len(contract)} masked parameters", vector=("values", "selected elements"))
    w = _weights(messages)
    for name, m in selected.items():
        mean = sum(wi * msg.values[name].double() for wi, msg in zip(w, messages))
        out[name][m] = mean.to(out[name].dtype)
    return out


# -- BatchNorm statistics of reset channels -----------------------------------------------------------------
STATISTICS = ("running_mean", "running_var")


def _statistic_key(bn: str, stat: str) -> str:
    return f"{bn}.{stat}" if bn else stat


def selected_statistics(arrays: Mapping[str, Tensor], channels: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The running statistics of the selected BatchNorm channels (``channels``:
    :func:`~lightning_unlearn.reset.selected_batchnorm_channels`)."""
    return {_statistic_key(bn, s): arrays[_statistic_key(bn, s)][sel].clone()
            for bn, sel in channels.items() for s in STATISTICS}


def statistic_masks(channels: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{running statistic name: bool vector}``: where :func:`selected_statistics` values go back."""
    return {_statistic_key(bn, s): sel for bn, sel in channels.items() for s in STATISTICS}


def pool_batchnorm_moments(
    messages: Sequence[BatchNormStatsMessage],
    channels: Mapping[str, Tensor],
    senders: Sequence[int] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """BatchNorm name -> (mean, unbiased variance) of its selected channels' input over all clients' values.

    Counts, sums and sums of squares add up, so this is exactly the estimate on the union of the clients'
    data. Every reply must hold exactly one float64 ``(3, k)`` tensor per BatchNorm of ``channels`` (``k``
    selected channels), whose count row is one whole number shared by all channels, positive when the
    client forwarded samples, and whose sums are moments of real values (sum of squares >= sum^2 / count).
    """
    messages = check_upward(messages, (BatchNormStatsMessage,), senders)
    if not messages:
        raise ValueError("no client has retain data: no BatchNorm statistics to pool")
    contract = {bn: ((3, int(sel.sum())), torch.float64) for bn, sel in channels.items()}
    for i, m in enumerate(messages):
        who = sender_label(senders, i)
        check_arrays(m.moments, contract, who, "BatchNormStatsMessage", f"the {len(contract)} selected BatchNorm layers")
        for bn, t in m.moments.items():
            count, total, squares = t
            if not bool((count == count[0]).all()) or float(count[0]) != math.floor(float(count[0])) or count[0] < 0:
                raise ValueError(f"{who}: BatchNormStatsMessage {bn!r} count row must be one whole number >= 0 shared "
                                 f"by every channel, got {short_repr(count.tolist())}")
            if (count[0] > 0) != (m.num_samples > 0):
                raise ValueError(f"{who}: BatchNormStatsMessage {bn!r} counts {int(count[0])} values from "
                                 f"{m.num_samples} samples")
            spread = squares * count[0] - total * total  # count^2 x the variance of the values: never negative
            if bool((spread < -1e-9 * (squares * count[0]) - 1e-12).any()):
                raise ValueError(f"{who}: BatchNormStatsMessage {bn!r} sums of squares are below sum^2 / count: "
                                 "not the moments of real values")
    pooled = {}
    for bn in channels:
        count, total, squares = sum(m.moments[bn] for m in messages)
        n = float(count[0])
        if n < 2:
            raise ValueError(f"BatchNorm {bn!r}: the clients sent {n:g} values; the variance needs at least 2")
        mean = total / n
        var = ((squares - total * mean) / (n - 1)).clamp(min=0.0)
        pooled[bn] = (mean, var)
    return pooled


@torch.no_grad()
def write_batchnorm_statistics(
    model: nn.Module, channels: Mapping[str, Tensor], pooled: Mapping[str, tuple[Tensor, Tensor]]
) -> None:
    """Write the pooled (mean, variance) into the selected channels' running statistics; nothing else moves."""
    modules = dict(model.named_modules())
    for bn, sel in channels.items():
        module, (mean, var) = modules[bn], pooled[bn]
        sel = sel.to(module.running_mean.device)
        module.running_mean[sel] = mean.to(module.running_mean)
        module.running_var[sel] = var.to(module.running_var)


# -- FedAvg -----------------------------------------------------------------------------------------------
@dataclass
class UpdateStore:
    """FedEraser's memory: every ``every``-th round, the global model and each client's update."""

    every: int
    rounds: list[dict] = field(default_factory=list)  # {"round", "global", "updates": {cid: arrays}, "counts": {cid: n}}

    @property
    def nbytes(self) -> int:
        return int(sum(tensor_bytes(r["global"]) + sum(tensor_bytes(u) for u in r["updates"].values()) for r in self.rounds))


@dataclass
class FedAvgResult:
    """The trained global model plus per-round metrics, timings and bytes."""

    model: nn.Module
    history: list[dict]
    store: UpdateStore | None = None

    @property
    def overhead_fraction(self) -> float:
        """Orchestration time (everything but local training and evaluation) / local training time."""
        local = sum(r["local_compute_s"] for r in self.history)
        over = sum(r["overhead_s"] for r in self.history)
        return over / local if local else math.nan

    @property
    def wall_s(self) -> float:
        return float(sum(r["round_s"] for r in self.history))

    @property
    def bytes_per_round(self) -> float:
        return float(np.mean([r["bytes_down"] + r["bytes_up"] for r in self.history])) if self.history else math.nan


def check_same_run(path: Path, stored: Mapping[str, str] | None, current: Mapping[str, str] | None) -> None:
    """A resume file is reused only by the run that wrote it; otherwise say what differs and how to start fresh."""
    stored, current = dict(stored or {}), dict(current or {})
    differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if differ:
        raise ValueError(f"{path} was written by a different run ({', '.join(differ)} changed); start fresh with "
                         "--federated.fresh true (resume=False) or use another output_dir")


def check_rounds(rounds: int, name: str = "rounds") -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {rounds!r}")


def check_fraction(fraction: float, name: str = "fraction") -> None:
    """A share of clients per round: a number in (0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")


def sample_clients(pool: Sequence[int], fraction: float, seed: int, r: int) -> np.ndarray:
    """Round ``r``'s clients (sorted): a seeded draw of ``round(fraction * len(pool))``, at least one.

    Shared with the Flower strategy, so both engines sample the same clients.
    """
    pool = np.asarray(sorted(pool), dtype=np.int64)
    return np.sort(np.random.default_rng(seed * 100_003 + r).choice(pool, max(1, round(fraction * len(pool))), replace=False))


def fit_config(cid: int, r: int, seed: int, local_epochs: int, data: str, local_config: Mapping[str, Any] | None) -> dict:
    """Client ``cid``'s settings for FedAvg round ``r`` (its own seed per round)."""
    return {"epochs": local_epochs, "seed": seed * 100_003 + r * 1_000 + int(cid), "data": data, **(local_config or {})}


def run_fedavg(
    model: pl.LightningModule,
    clients: Sequence[Any],
    rounds: int,
    fraction: float = 1.0,
    local_epochs: int = 1,
    seed: int = 0,
    data: str = "all",
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    store_every: int | None = None,
    deploy: bool = True,
    transport: Transport | None = None,
    local_config: Mapping[str, Any] | None = None,
    progress: bool = True,
    label: str = "fedavg",
    participants: Sequence[int] | None = None,
    run_key: Mapping[str, str] | None = None,
) -> FedAvgResult:
    """Federated averaging: ``rounds`` rounds of local Lightning training on a sampled ``fraction`` of clients.

    Args:
        data: what each client trains on: ``"all"`` its shard, ``"retain"`` its data minus the forget set.
        evaluate: server-side evaluation of the global model after each round (e.g. global test accuracy).
        checkpoint_dir: write ``fedavg.pt`` (global model, history, store) atomically after every round;
            with ``resume=True`` an existing one is continued from its next round, but only if it was
            written by the same run: ``run_key`` (e.g. :meth:`FederatedSimulation.run_key`: hashes of the
            data split, partition, model and schedule) must match the one stored, else a ValueError names
            what differs.
        store_every: keep the client updates of every n-th round (FedEraser needs them); their size
            is reported by ``result.store.nbytes``.
        deploy: broadcast the final model to every client (the model they later unlearn from).
        participants: ids of the clients that may be sampled (default: all; retraining leaves out
            clients without retain data).

    ``model`` is updated in place with the final global arrays.
    """
    check_rounds(rounds)
    check_rounds(local_epochs, "local_epochs")
    check_fraction(fraction)
    if data not in ("all", "retain"):
        raise ValueError(f"unknown data {data!r}; allowed values are ['all', 'retain']")
    transport = transport or Transport()
    global_arrays = get_arrays(model)
    history: list[dict] = []
    store = UpdateStore(store_every) if store_every else None
    start_round = 0
    ckpt = Path(checkpoint_dir) / "fedavg.pt" if checkpoint_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state = load_torch_file(ckpt, "FedAvg resume file")
        check_same_run(ckpt, state.get("run") if isinstance(state, dict) else None, run_key)
        global_arrays, history, start_round = state["global"], state["history"], state["round"] + 1
        if store is not None and state.get("store") is not None:
            store.rounds = state["store"]
    pool = np.asarray(sorted(participants) if participants is not None else range(len(clients)), dtype=np.int64)
    if not len(pool):
        raise ValueError("no client may take part in FedAvg (participants is empty)")
    bar = tqdm(range(start_round, rounds), desc="FedAvg", disable=not progress, leave=False)
    for r in bar:
        t0 = time.perf_counter()
        rb = transport.start_round(f"{label}/{r}")
        picked = sample_clients(pool, fraction, seed, r)
        replies: list[tuple[int, ParametersMessage]] = []
        for cid in picked:
            config = fit_config(int(cid), r, seed, local_epochs, data, local_config)
            reply = transport.call(clients[cid], "fit", Broadcast(global_arrays, config))
            if reply is not None:
                replies.append((int(cid), reply))
        if not replies:
            raise ValueError(f"round {r}: no sampled client had data to train on")
        t_agg = time.perf_counter()
        new_arrays = fedavg_aggregate([m for _, m in replies], global_arrays, senders=[c for c, _ in replies])
        if store is not None and r % store.every == 0:
            store.rounds.append({
                "round": r, "global": global_arrays,
                "updates": {cid: {k: m.arrays[k] - global_arrays[k] for k in global_arrays} for cid, m in replies},
                "counts": {cid: m.num_samples for cid, m in replies},
            })
        global_arrays = new_arrays
        agg_s = time.perf_counter() - t_agg
        t_eval = time.perf_counter()
        row: dict[str, Any] = {"round": r, "clients": [c for c, _ in replies]}
        if evaluate is not None:
            set_arrays(model, global_arrays)
            row.update({k: float(v) for k, v in evaluate(model).items()})
        eval_s = time.perf_counter() - t_eval
        local = sum(m.metrics.get("local_compute_s", 0.0) for _, m in replies)
        row.update({"local_compute_s": local, "aggregate_s": agg_s, "eval_s": eval_s,
                    "bytes_down": rb.down, "bytes_up": rb.up})
        row["round_s"] = time.perf_counter() - t0
        row["overhead_s"] = row["round_s"] - eval_s - local
        t_ck = time.perf_counter()
        if ckpt is not None:
            save_torch({"round": r, "run": dict(run_key or {}), "global": global_arrays, "history": history + [row],
                          "store": store.rounds if store is not None else None}, ckpt)
        row["checkpoint_s"] = time.perf_counter() - t_ck  # in memory only; the saved row stops before saving
        row["round_s"] += row["checkpoint_s"]
        row["overhead_s"] += row["checkpoint_s"]
        history.append(row)
        if evaluate is not None and "test_acc" in row:
            bar.set_postfix(test_acc=f"{row['test_acc']:.4f}")
    set_arrays(model, global_arrays)
    if deploy:
        transport.start_round("deploy")
        for c in clients:
            transport.call(c, "deploy", Broadcast(global_arrays))
    return FedAvgResult(model, history, store)
