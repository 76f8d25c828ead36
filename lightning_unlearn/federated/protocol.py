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
from lightning_unlearn.federated.client import get_arrays, selected_values, set_arrays
from lightning_unlearn.federated.messages import Broadcast, RoundBytes, Transport
from lightning_unlearn.federated.server import aggregate_scores, check_rounds, masked_aggregate
from lightning_unlearn.objectives import OBJECTIVES
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.selection import ParameterMask, select_channels

AUTO_OBJECTIVE = {"class": "retain", "client": "retain", "sample": "retain"}
#: Learning-rate multiplier of the forgotten classes' head rows in the masked rounds (see :func:`federated_unlearn`).
HEAD_LR_SCALE = 10.0


@dataclass
class FederatedUnlearningResult:
    """What every federated unlearning method returns: the model, its mask and the cost."""

    model: pl.LightningModule
    method: str
    mask: ParameterMask | None
    timings_s: dict[str, float]
    bytes: dict[str, float]
    scores: ChannelScores | None = None
    history: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def round_bytes(history: Sequence[Mapping[str, Any]], extra: int = 0) -> dict[str, float]:
    """Bytes per unlearning round (mean and max over rounds, down + up) and in total with ``extra`` (scoring)."""
    per = [r["bytes_down"] + r["bytes_up"] for r in history]
    return {"scoring": extra, "unlearning_round": sum(per) / len(per), "unlearning_round_max": max(per),
            "total": extra + sum(per)}


def resolve_objective(objective: str, request: ForgetRequest) -> str:
    """``"auto"``: retain-only masked updates for every request kind.

    Class requests: the forgotten classes' head rows are always selected and are a negative
    class on every retain sample, so retain cross-entropy alone pushes their logits down (with
    :data:`HEAD_LR_SCALE`: 0% forget accuracy in one round of 5 steps on MNIST). A forget term
    (random labels, ascent) on the explained body channels, which the forgotten class shares
    with the others, cost 1-2 points of remaining accuracy at the user's rate and 8 at 10x.
    Client and sample requests: the retrained reference still generalises to the forgotten
    samples, so pushing them to wrong labels would overshoot it.
    """
    if objective == "auto":
        return AUTO_OBJECTIVE[request.kind]
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed objectives are {['auto', *OBJECTIVES]}")
    return objective


def collect_scores(
    clients: Sequence[Any], transport: Transport, config: Mapping[str, Any]
) -> tuple[ChannelScores, RoundBytes]:
    """Scoring round: every client with forget data sends (scores, count); the server averages them."""
    rb = transport.start_round("score")
    replies = [r for c in clients if (r := transport.call(c, "score", Broadcast({}, dict(config)))) is not None]
    if not replies:
        raise ValueError("no client holds data to forget: nothing to score")
    return aggregate_scores(replies), rb


def all_channels(layers: Mapping[str, LayerInfo]) -> dict[str, list[int]]:
    """Every channel of every scorable layer: the fine-tune-all mask in channel form."""
    return {n: list(range(i.out_channels)) for n, i in layers.items()}


def score_config(method: str, max_samples: int | None, contrast: bool, seed: int,
                 layers: Sequence[str] | None) -> dict[str, Any]:
    """Settings of the scoring round (shared with the Flower strategy)."""
    return {"method": method, "max_samples": max_samples, "contrast": contrast, "seed": seed, "layers": layers}


def unlearn_config(objective: str, local_epochs: int, max_steps: int | None, seed: int, forget_weight: float,
                   lr_scale: float, head_lr_scale: float | None = HEAD_LR_SCALE) -> dict[str, Any]:
    """Settings of the masked rounds (shared with the Flower strategy); :func:`round_config` seeds each round.

    ``head_lr_scale`` (``None``: same as ``lr_scale``) is the learning-rate multiplier of the head
    parameters when the mask selects head rows (class requests: only the forgotten rows train there).
    """
    config = {"objective": objective, "epochs": local_epochs, "max_steps": max_steps, "seed": seed,
              "forget_weight": forget_weight, "lr_scale": lr_scale, "mode": "train"}
    if head_lr_scale is not None:
        config["head_lr_scale"] = head_lr_scale
    return config


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
        replies = [m for c in clients if (m := transport.call(c, "masked_update", down)) is not None]
        if not replies:
            raise ValueError("no client has retain data for the masked rounds")
        current = masked_aggregate(reference, mask, replies)
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
    method: str = "grad_x_act",
    ratio: float = 0.05,
    objective: str = "auto",
    rounds: int = 1,
    local_epochs: int = 1,
    max_steps: int | None = None,
    scope: str = "layer",
    include_head: bool = False,
    layers: Sequence[str] | None = None,
    max_samples: int | None = 256,
    contrast: bool = False,
    forget_weight: float = 1.0,
    lr_scale: float = 1.0,
    seed: int = 0,
    transport: Transport | None = None,
    inplace: bool = False,
    head_lr_scale: float | None = HEAD_LR_SCALE,
) -> FederatedUnlearningResult:
    """Make the federation forget ``request`` by updating only the channels that explain the forget data.

    ``model`` is the deployed global model (the server's copy); clients must hold it too
    (:func:`~lightning_unlearn.federated.server.run_fedavg` deploys it) and have received the
    request. ``max_steps`` caps each client's local steps per round (cheap rounds); ``max_samples``
    caps each client's scored forget samples; ``layers`` restricts scoring and selection to those
    layers (the forgotten classes' head rows are always selected); ``lr_scale`` multiplies the clients' learning rate
    during the masked rounds.

    Defaults (MNIST, 10 Dirichlet clients, see BENCHMARKS.md): ``objective="auto"`` (retain-only
    updates), explained channels at the user's rate (``lr_scale=1``) and the forgotten classes'
    head rows at ``head_lr_scale=10``. The head rows are used by no other class and must move far
    (their logit has to lose every argmax); the explained body channels are shared with the
    remaining classes, and a 10x rate on them cost 3-8 points of remaining accuracy. ``None``
    gives the head rows ``lr_scale`` like every other selected parameter.
    """
    check_rounds(rounds)
    objective = resolve_objective(objective, request)
    transport = transport or Transport()
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    scores, score_bytes = collect_scores(clients, transport, score_config(method, max_samples, contrast, seed, layers))
    head_rows = list(request.classes) or None
    mask = select_channels(scores, work, ratio, scope, None, include_head, head_rows)
    t1 = time.perf_counter()
    config = unlearn_config(objective, local_epochs, max_steps, seed, forget_weight, lr_scale, head_lr_scale)
    _, history = masked_rounds(work, clients, mask, rounds, config, transport)
    t2 = time.perf_counter()
    return FederatedUnlearningResult(
        work, "ours", mask, {"scoring": t1 - t0, "unlearning": t2 - t1, "total": t2 - t0},
        round_bytes(history, score_bytes.total), scores, history, {"objective": objective, "ratio": ratio, "scope": scope, "rounds": rounds,
                          "max_steps": max_steps, "lr_scale": lr_scale, "head_lr_scale": head_lr_scale,
                          "forget_weight": forget_weight, "method_scoring": method,
                          "layers": list(layers) if layers else "all"},
    )
