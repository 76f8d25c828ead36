"""The federated unlearning protocol (Xu et al. 2024): local scores -> global mask -> masked FedAvg rounds.

1. Clients holding forget data explain the deployed model on it and send one score per
   channel with their sample count (:meth:`FederatedClient.score`).
2. The server averages the scores by count and selects channels with the shared orchestration
   (:func:`~lightning_unlearn.orchestration.prepare`, as the central callback and the Flower server do);
   it sends the mask once, as channel indices.
2b. Remove, then repair (``UnlearnConfig.reset``): the server resets the selected slices of its
   global model (:func:`~lightning_unlearn.orchestration.apply_reset`: ``"reinit"``, seeded draws from the
   model's own initialisation; ``"dampen"``) and, when the mask selects BatchNorm channels, runs one
   statistics round (:func:`remove_selected`):
   clients send the count, sum and sum of squares of those channels' input on their retain data, and
   the server writes the pooled mean and variance into their running statistics. Every masked round
   then carries the selected values and those statistics (the clients' deployed copy no longer holds them).
3. Clients with retain data run masked local updates (retain data, plus forget data for
   forget-aware objectives); a leaving client sends scores but nothing afterwards. With
   ``fraction < 1`` each round calls a seeded sample of the clients (as FedAvg does); a client
   gets the mask with its first call. Scoring and statistics rounds always ask every client.
4. The server averages only the selected slices of the round's replies (:func:`masked_aggregate`): every frozen
   element of the global model stays bit-exact.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.scoring.layers import LayerInfo
from lightning_unlearn.config import AUTO, UnlearnConfig
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays
from lightning_unlearn.federated.messages import Broadcast, RoundBytes, Transport
from lightning_unlearn.federated.server import (
    aggregate_scores,
    check_fraction,
    check_rounds,
    masked_aggregate,
    pool_batchnorm_moments,
    sample_clients,
    selected_statistics,
    write_batchnorm_statistics,
)
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.orchestration import apply_reset, prepare
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.result import UnlearningResult

#: Learning-rate multiplier of the forgotten classes' head rows when ``head_lr_scale="auto"`` (see :data:`AUTO`).
HEAD_LR_SCALE = AUTO["federated"]["head_lr_scale"]
#: Retain batches each client forwards in the statistics round (the central re-estimation's default, too).
STATS_BATCHES = 20


@dataclass
class FederatedUnlearningResult(UnlearningResult):
    """An :class:`UnlearningResult` plus what the federation paid: bytes per round and per-round rows.

    ``metrics`` stays empty on the server (it sees no data); the simulation's oracle fills it.
    """

    bytes: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def round_bytes(history: Sequence[Mapping[str, Any]], extra: int = 0, statistics: int = 0) -> dict[str, float]:
    """Bytes per unlearning round (mean and max over rounds, down + up) and in total with ``extra`` (scoring)
    and ``statistics`` (the BatchNorm statistics round after a reset; the key appears only when it ran)."""
    per = [r["bytes_down"] + r["bytes_up"] for r in history]
    out = {"scoring": extra, "unlearning_round": sum(per) / len(per), "unlearning_round_max": max(per),
           "total": extra + statistics + sum(per)}
    if statistics:
        out["statistics"] = statistics
    return out


def collect_scores(
    clients: Sequence[Any], transport: Transport, config: Mapping[str, Any], model: torch.nn.Module | None = None
) -> tuple[ChannelScores, RoundBytes]:
    """Scoring round: every client with forget data sends (scores, count); the server averages them
    (checking each reply's layers against ``model``, the server's copy, when given)."""
    rb = transport.start_round("score")
    down = Broadcast({}, dict(config))
    pairs = [(i, r) for i, c in enumerate(clients) if (r := transport.call(c, "score", down)) is not None]
    if not pairs:
        raise ValueError("no client holds data to forget: nothing to score")
    return aggregate_scores([r for _, r in pairs], senders=[i for i, _ in pairs], model=model), rb


def all_channels(layers: Mapping[str, LayerInfo]) -> dict[str, list[int]]:
    """Every channel of every scorable layer: the fine-tune-all mask in channel form."""
    return {n: list(range(i.out_channels)) for n, i in layers.items()}


def score_config(config: UnlearnConfig) -> dict[str, Any]:
    """Settings of the scoring round as sent to the clients (shared with the Flower strategy)."""
    return {"method": config.method, "max_samples": config.max_samples, "contrast": config.contrast,
            "seed": config.seed, "layers": config.layers}


def unlearn_config(config: UnlearnConfig) -> dict[str, Any]:
    """Settings of the masked rounds as sent to the clients (shared with the Flower strategy).

    ``config`` must be resolved (:meth:`UnlearnConfig.resolved`); :func:`round_config` seeds each round.
    ``head_lr_scale`` is the learning-rate multiplier of the head parameters when the mask selects
    head rows (class requests: only the forgotten rows train there); absent, they get ``lr_scale``.
    """
    if "auto" in (config.objective, config.head_lr_scale):
        raise ValueError("unlearn_config needs a resolved UnlearnConfig (call config.resolved(request, 'federated'))")
    out = {"objective": config.objective, "epochs": config.epochs, "max_steps": config.max_steps, "seed": config.seed,
           "forget_weight": config.forget_weight, "lr_scale": config.lr_scale, "bn_stats": config.bn_stats,
           "mode": "train"}
    if config.head_lr_scale is not None:
        out["head_lr_scale"] = config.head_lr_scale
    return out


def round_config(config: Mapping[str, Any], r: int) -> dict[str, Any]:
    return {**config, "seed": int(config.get("seed", 0)) * 1_000 + r}


def masked_broadcast(
    current: Mapping[str, Tensor], mask: ParameterMask, config: Mapping[str, Any], r: int, send_mask: bool,
    statistics: Mapping[str, Tensor] | None = None,
) -> Broadcast:
    """Masked round ``r``'s broadcast (shared with the Flower strategy).

    Without a reset (``statistics`` None) round 0 sends no values: every client holds the deployed model.
    After a reset every round sends the selected slices and the running statistics of the selected
    BatchNorm channels (``statistics``: :func:`~lightning_unlearn.reset.selected_batchnorm_channels`).
    ``send_mask``: the channel indices travel too (round 0, or the first round after a server restart).
    """
    values: dict[str, Tensor] = {}
    if r > 0 or statistics is not None:
        values = selected_values(current, mask)
    if statistics is not None:
        values.update(selected_statistics(current, statistics))
    channels = {k: tuple(v) for k, v in mask.channels.items()} if send_mask else None
    return Broadcast(values, round_config(config, r), channels)


def statistics_broadcast(model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig) -> Broadcast:
    """The statistics round's broadcast: the mask, the reset selected slices and how many batches to forward."""
    return Broadcast(selected_values(get_arrays(model), mask), {"seed": config.seed, "max_batches": STATS_BATCHES},
                     {k: tuple(v) for k, v in mask.channels.items()})


def remove_selected(
    model: torch.nn.Module, clients: Sequence[Any], mask: ParameterMask, config: UnlearnConfig, transport: Transport,
) -> tuple[dict[str, Tensor] | None, RoundBytes | None]:
    """``config.reset``: reset the selected slices of the server's ``model`` (the shared
    :func:`~lightning_unlearn.orchestration.apply_reset`, seeded) and re-estimate the running statistics of
    its selected BatchNorm channels with the clients (the server holds no data).

    Returns ``(statistics, round bytes)``: ``statistics`` (BatchNorm name -> selected channels) is None
    without a reset (nothing to send beyond today's masked rounds); the bytes are None when no statistics
    round ran (no reset, or no selected BatchNorm channel: an MLP, GroupNorm). Every other element of
    ``model``, running statistics included, stays bit-exact.
    """
    if config.reset == "none":
        return None, None
    channels = apply_reset(model, mask, config).batchnorm_channels
    if not channels:
        return channels, None
    rb = transport.start_round("bn_stats")
    down = statistics_broadcast(model, mask, config)
    pairs = [(i, m) for i, c in enumerate(clients) if (m := transport.call(c, "bn_statistics", down)) is not None]
    write_batchnorm_statistics(model, channels, pool_batchnorm_moments([m for _, m in pairs], channels,
                                                                       senders=[i for i, _ in pairs]))
    return channels, rb


@dataclass
class Removal:
    """The server's steps before the masked rounds: the averaged ``scores``, the ``mask``, and the selected
    BatchNorm channels whose statistics the clients re-estimated (``statistics``; None without a reset)."""

    scores: ChannelScores
    mask: ParameterMask
    statistics: dict[str, Tensor] | None
    score_bytes: int = 0
    statistics_bytes: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)


def select_and_remove(
    model: torch.nn.Module, clients: Sequence[Any], config: UnlearnConfig, transport: Transport,
) -> Removal:
    """Scoring round -> :func:`~lightning_unlearn.orchestration.prepare` -> :func:`remove_selected`, on the
    server's ``model`` with a resolved ``config``: the score -> select -> reset path every engine shares."""
    t0 = time.perf_counter()
    scores, score_bytes = collect_scores(clients, transport, score_config(config), model)
    mask = prepare(model, scores, config)
    t1 = time.perf_counter()
    statistics, stats_bytes = remove_selected(model, clients, mask, config, transport)
    timings = {"scoring": t1 - t0}
    if config.reset != "none":
        timings["reset"] = time.perf_counter() - t1
    return Removal(scores, mask, statistics, score_bytes.total, stats_bytes.total if stats_bytes else 0, timings)


def masked_rounds(
    model: pl.LightningModule,
    clients: Sequence[Any],
    mask: ParameterMask,
    rounds: int,
    config: Mapping[str, Any],
    transport: Transport,
    reference: Mapping[str, Tensor] | None = None,
    label: str = "unlearn",
    statistics: Mapping[str, Tensor] | None = None,
    fraction: float = 1.0,
    seed: int | None = None,
) -> tuple[dict[str, Tensor], list[dict]]:
    """Run ``rounds`` masked FedAvg rounds; returns the global arrays and per-round rows.

    Round ``r`` calls the clients of ``sample_clients(range(len(clients)), fraction, seed, r)`` (the
    draw FedAvg uses; ``seed`` defaults to ``config["seed"]``); ``fraction=1.0`` calls every client.
    A client gets the mask (as channel indices) with its first call; then it needs no values in round 0
    (it holds the deployed model), and the current selected slices from round 1 on. After a reset
    (``statistics`` from :func:`remove_selected`) every call carries the selected slices and the selected
    BatchNorm channels' statistics (:func:`masked_broadcast`). Replies carry selected slices only; only the
    replies of the round's clients are averaged (by sample count), every other element stays bit-exact.
    A sampled round in which no client has retain data keeps the selected values (with a warning).
    """
    check_rounds(rounds)
    check_fraction(fraction)
    seed = int(config.get("seed", 0)) if seed is None else seed
    reference = {k: v.clone() for k, v in (reference if reference is not None else get_arrays(model)).items()}
    current = reference
    history = []
    has_mask: set[int] = set()
    for r in range(rounds):
        t0 = time.perf_counter()
        rb: RoundBytes = transport.start_round(f"{label}/{r}")
        picked = [int(i) for i in sample_clients(range(len(clients)), fraction, seed, r)]
        down = {send: masked_broadcast(current, mask, config, r, send, statistics) for send in (True, False)}
        pairs = []
        for i in picked:
            reply = transport.call(clients[i], "masked_update", down[i not in has_mask])
            has_mask.add(i)
            if reply is not None:
                pairs.append((i, reply))
        replies = [m for _, m in pairs]
        if not replies and len(picked) == len(clients):
            raise ValueError("no client has retain data for the masked rounds")
        if replies:
            current = masked_aggregate(reference, mask, replies, senders=[i for i, _ in pairs])
        else:
            rank_zero_warn(f"masked round {r}: none of the sampled clients {picked} has retain data; "
                           "the selected values stay as they are")
        local = sum(m.metrics.get("local_compute_s", 0.0) for m in replies)
        round_s = time.perf_counter() - t0
        row = {"round": r, "clients": len(replies), "round_s": round_s, "local_compute_s": local,
               "overhead_s": round_s - local, "bytes_down": rb.down, "bytes_up": rb.up}
        if fraction < 1:
            row["sampled"] = picked
        history.append(row)
    if not any(row["clients"] for row in history):
        raise ValueError(f"no sampled client had retain data in any of the {rounds} masked rounds "
                         f"(fraction {fraction}); raise the fraction or the rounds")
    set_arrays(model, current)
    return current, history


def federated_unlearn(
    model: pl.LightningModule,
    clients: Sequence[Any],
    request: ForgetRequest,
    config: UnlearnConfig | None = None,
    *,
    rounds: int = 1,
    fraction: float = 1.0,
    transport: Transport | None = None,
    inplace: bool = False,
    **overrides: Any,
) -> FederatedUnlearningResult:
    """Make the federation forget ``request`` by updating only the channels that explain the forget data.

    ``model`` is the deployed global model (the server's copy); clients must hold it too
    (:func:`~lightning_unlearn.federated.server.run_fedavg` deploys it) and have received the
    request. ``config`` is the same :class:`UnlearnConfig` as centrally (``overrides`` replace single
    fields): ``epochs`` / ``max_steps`` are each client's budget per masked round, ``max_samples``
    caps each client's scored forget samples, ``layers`` restricts scoring and selection.

    ``fraction``: share of the clients each masked round calls (a seeded draw per round with
    ``config.seed``, :func:`~lightning_unlearn.federated.server.sample_clients`, as FedAvg samples).
    The scoring round and the BatchNorm statistics round after a reset still ask every client: the
    scores and the moments are count-weighted sums over the whole federation's forget / retain data,
    and a sample of them would select (and re-estimate) different channels. Both are one forward/backward
    pass over at most ``max_samples`` (scoring) or ``STATS_BATCHES`` batches (statistics) per client,
    with no training; see BENCHMARKS.md "Federated scale" for their cost at 100 clients.

    Defaults (``"auto"``, see :data:`~lightning_unlearn.config.AUTO`; MNIST, 10 Dirichlet clients,
    BENCHMARKS.md): retain-only updates, explained channels at the user's rate (``lr_scale=1``) and
    the forgotten classes' head rows at 10x. The head rows are used by no other class and must move
    far (their logit has to lose every argmax); the explained body channels are shared with the
    remaining classes, and a 10x rate on them cost 3-8 points of remaining accuracy.
    """
    check_rounds(rounds)
    check_fraction(fraction)
    cfg = UnlearnConfig.build(config, **overrides).resolved(request, "federated")
    transport = transport or Transport()
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    removal = select_and_remove(work, clients, cfg, transport)
    t1 = t0 + removal.timings_s["scoring"]
    _, history = masked_rounds(work, clients, removal.mask, rounds, unlearn_config(cfg), transport,
                               statistics=removal.statistics, fraction=fraction, seed=cfg.seed)
    t3 = time.perf_counter()
    timings = {**removal.timings_s, "unlearning": t3 - t1, "total": t3 - t0}
    return FederatedUnlearningResult(
        work, removal.mask, timings_s=timings, scores=removal.scores, extra={"rounds": rounds, "fraction": fraction},
        method="selective", config=cfg, bytes=round_bytes(history, removal.score_bytes, removal.statistics_bytes),
        history=history,
    )
