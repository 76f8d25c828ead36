"""The federated unlearning protocol (Xu et al. 2024): local scores -> global mask -> masked FedAvg rounds.

1. Clients holding forget data explain the deployed model on it and send one score per
   channel with their sample count (:meth:`FederatedClient.score`).
2. The server averages the scores by count, selects channels (:func:`select_channels`)
   and sends the mask once, as channel indices.
3. Clients with retain data run masked local updates (retain data, plus forget data for
   forget-aware objectives); a leaving client sends scores but nothing afterwards.
4. The server averages only the selected slices (:func:`masked_aggregate`): every frozen
   element of the global model stays bit-exact.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_unlearn.attribution import ChannelScores, LayerInfo
from lightning_unlearn.config import AUTO, UnlearnConfig
from lightning_unlearn.federated.arrays import get_arrays, selected_values, set_arrays
from lightning_unlearn.federated.messages import Broadcast, RoundBytes, Transport
from lightning_unlearn.federated.server import aggregate_scores, check_rounds, masked_aggregate
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.selection import ParameterMask, select_channels

#: Learning-rate multiplier of the forgotten classes' head rows when ``head_lr_scale="auto"`` (see :data:`AUTO`).
HEAD_LR_SCALE = AUTO["federated"]["head_lr_scale"]


@dataclass
class FederatedUnlearningResult(UnlearningResult):
    """An :class:`UnlearningResult` plus what the federation paid: bytes per round and per-round rows.

    ``metrics`` stays empty on the server (it sees no data); the simulation's oracle fills it.
    """

    bytes: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def round_bytes(history: Sequence[Mapping[str, Any]], extra: int = 0) -> dict[str, float]:
    """Bytes per unlearning round (mean and max over rounds, down + up) and in total with ``extra`` (scoring)."""
    per = [r["bytes_down"] + r["bytes_up"] for r in history]
    return {"scoring": extra, "unlearning_round": sum(per) / len(per), "unlearning_round_max": max(per),
            "total": extra + sum(per)}


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


def masked_rounds(
    model: pl.LightningModule,
    clients: Sequence[Any],
    mask: ParameterMask,
    rounds: int,
    config: Mapping[str, Any],
    transport: Transport,
    reference: Mapping[str, Tensor] | None = None,
    label: str = "unlearn",
) -> tuple[dict[str, Tensor], list[dict]]:
    """Run ``rounds`` masked FedAvg rounds; returns the global arrays and per-round rows.

    Round 0 sends only the mask (as channel indices): every client already holds the deployed
    model. Later rounds send the current selected slices. Replies carry selected slices only.
    """
    check_rounds(rounds)
    reference = {k: v.clone() for k, v in (reference if reference is not None else get_arrays(model)).items()}
    current = reference
    history = []
    channels = {k: tuple(v) for k, v in mask.channels.items()}
    for r in range(rounds):
        t0 = time.perf_counter()
        rb: RoundBytes = transport.start_round(f"{label}/{r}")
        cfg = round_config(config, r)
        down = Broadcast({} if r == 0 else selected_values(current, mask), cfg, channels if r == 0 else None)
        pairs = [(i, m) for i, c in enumerate(clients) if (m := transport.call(c, "masked_update", down)) is not None]
        replies = [m for _, m in pairs]
        if not replies:
            raise ValueError("no client has retain data for the masked rounds")
        current = masked_aggregate(reference, mask, replies, senders=[i for i, _ in pairs])
        local = sum(m.metrics.get("local_compute_s", 0.0) for m in replies)
        round_s = time.perf_counter() - t0
        history.append({"round": r, "clients": len(replies), "round_s": round_s, "local_compute_s": local,
                        "overhead_s": round_s - local, "bytes_down": rb.down, "bytes_up": rb.up})
    set_arrays(model, current)
    return current, history


def federated_unlearn(
    model: pl.LightningModule,
    clients: Sequence[Any],
    request: ForgetRequest,
    config: UnlearnConfig | None = None,
    *,
    rounds: int = 1,
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

    Defaults (``"auto"``, see :data:`~lightning_unlearn.config.AUTO`; MNIST, 10 Dirichlet clients,
    BENCHMARKS.md): retain-only updates, explained channels at the user's rate (``lr_scale=1``) and
    the forgotten classes' head rows at 10x. The head rows are used by no other class and must move
    far (their logit has to lose every argmax); the explained body channels are shared with the
    remaining classes, and a 10x rate on them cost 3-8 points of remaining accuracy.
    """
    check_rounds(rounds)
    cfg = UnlearnConfig.build(config, **overrides).resolved(request, "federated")
    transport = transport or Transport()
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    scores, score_bytes = collect_scores(clients, transport, score_config(cfg), work)
    mask = select_channels(scores, work, cfg.ratio, cfg.scope, cfg.threshold, cfg.include_head, cfg.head_rows)
    t1 = time.perf_counter()
    _, history = masked_rounds(work, clients, mask, rounds, unlearn_config(cfg), transport)
    t2 = time.perf_counter()
    return FederatedUnlearningResult(
        work, mask, timings_s={"scoring": t1 - t0, "unlearning": t2 - t1, "total": t2 - t0}, scores=scores,
        extra={"rounds": rounds}, method="ours", config=cfg,
        bytes=round_bytes(history, score_bytes.total), history=history,
    )
