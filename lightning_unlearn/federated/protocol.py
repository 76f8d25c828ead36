"""The federated unlearning protocol (Xu et al. 2024) as server phases that run on any grid.

Each phase is one function of the :class:`~lightning_unlearn.federated.federation.Federation` (in process on a
:class:`~lightning_unlearn.federated.grid.LocalGrid`, or on a Flower deployment's grid), so a procedure is a
sequence of phase calls (:func:`federated_unlearn`, the Flower ServerApp, the baselines):

1. :func:`select`: clients holding forget data explain the deployed model on it and send one score per
   channel with their sample count; the server averages them by count and selects channels with the shared
   orchestration (:func:`~lightning_unlearn.orchestration.prepare`, as the central callback does).
2. :func:`remove` (``UnlearnConfig.reset``): the server resets the selected slices of its global model
   (:func:`~lightning_unlearn.orchestration.apply_reset`) and, when the mask selects BatchNorm channels, runs one
   statistics round: clients send the count, sum and sum of squares of those channels' input on their retain
   data, and the server writes the pooled mean and variance into their running statistics. Every masked round
   then carries the selected values and those statistics (the clients' deployed copy no longer holds them).
3. :func:`masked_rounds`: clients with retain data run masked local updates (retain data, plus forget data for
   forget-aware objectives); a leaving client sends scores but nothing afterwards. With ``fraction < 1`` each
   round calls a seeded sample of the clients (as FedAvg does); a client gets the mask with its first call.
   The server averages only the selected slices (:func:`masked_aggregate`): every frozen element stays bit-exact.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor

from lightning_unlearn.config import AUTO, UnlearnConfig
from lightning_unlearn.federated.federation import Federation, as_federation
from lightning_unlearn.federated.messages import Broadcast, ByteCounter, check_metrics
from lightning_unlearn.federated.server import (
    aggregate_scores,
    pool_head_features,
    check_fraction,
    check_rounds,
    masked_aggregate,
    pool_batchnorm_moments,
    sample_clients,
    selected_statistics,
    write_batchnorm_statistics,
)
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays
from lightning_unlearn.orchestration import apply_reset, prepare
from lightning_unlearn.repair.calibration import initial_rows, linear_head, require_rows_in_mask
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.scoring.layers import LayerInfo

log = logging.getLogger(__name__)

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
    traffic: ByteCounter | None = None  # payload and wire bytes per round label


def round_bytes(history: Sequence[Mapping[str, Any]], extra: int = 0, statistics: int = 0) -> dict[str, float]:
    """Bytes per unlearning round (mean and max over rounds, down + up) and in total with ``extra`` (scoring)
    and ``statistics`` (the BatchNorm statistics round after a reset; the key appears only when it ran)."""
    per = [r["bytes_down"] + r["bytes_up"] for r in history]
    out = {"scoring": extra, "unlearning_round": sum(per) / len(per), "unlearning_round_max": max(per),
           "total": extra + statistics + sum(per)}
    if statistics:
        out["statistics"] = statistics
    return out


def all_channels(layers: Mapping[str, LayerInfo]) -> dict[str, list[int]]:
    """Every channel of every scorable layer: the fine-tune-all mask in channel form."""
    return {n: list(range(i.out_channels)) for n, i in layers.items()}


def score_config(config: UnlearnConfig) -> dict[str, Any]:
    """Settings of the scoring round as sent to the clients."""
    return {"method": config.method, "max_samples": config.max_samples, "contrast": config.contrast,
            "seed": config.seed, "layers": config.layers}


def unlearn_config(config: UnlearnConfig) -> dict[str, Any]:
    """Settings of the masked rounds as sent to the clients.

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
    statistics: Mapping[str, Tensor] | None = None, values_always: bool = False,
) -> Broadcast:
    """Masked round ``r``'s broadcast.

    Without a reset (``statistics`` None) round 0 sends no values: every client holds the deployed model.
    After a reset every round sends the selected slices and the running statistics of the selected
    BatchNorm channels (``statistics``: :func:`~lightning_unlearn.reset.selected_batchnorm_channels`).
    ``send_mask``: the channel indices travel too (round 0, or the first round after a server restart).
    ``values_always``: round 0 sends the selected slices too (the head calibration starts from the repaired model).
    """
    values: dict[str, Tensor] = {}
    if r > 0 or statistics is not None or values_always:
        values = selected_values(current, mask)
    if statistics is not None:
        values.update(selected_statistics(current, statistics))
    channels = {k: tuple(v) for k, v in mask.channels.items()} if send_mask else None
    return Broadcast(values, round_config(config, r), channels)


def statistics_broadcast(model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig) -> Broadcast:
    """The statistics round's broadcast: the mask, the reset selected slices and how many batches to forward."""
    return Broadcast(selected_values(get_arrays(model), mask), {"seed": config.seed, "max_batches": STATS_BATCHES},
                     {k: tuple(v) for k, v in mask.channels.items()})




# -- phases ------------------------------------------------------------------------------------------------------
def select(fed: Federation, model: torch.nn.Module, config: UnlearnConfig) -> tuple[ChannelScores, ParameterMask]:
    """Scoring round, then the shared selection on the server's ``model`` (holding the deployed arrays).

    Every client is asked (a sample would select other channels); clients without forget data send nothing.
    """
    pairs = fed.ask(Broadcast({}, score_config(config)), "query.score", "score")
    if not pairs:
        raise ValueError("no client holds data to forget: nothing to score")
    scores = aggregate_scores([m for _, m in pairs], senders=[c for c, _ in pairs], model=model)
    return scores, prepare(model, scores, config)


def remove(fed: Federation, model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig) -> dict[str, Tensor] | None:
    """``config.reset``: reset the selected slices of ``model`` (seeded) and re-estimate the running statistics of
    its selected BatchNorm channels with the clients (the server holds no data).

    Returns the selected BatchNorm channels (BatchNorm name -> bool vector; empty when none is selected), or
    None without a reset. Every other element of ``model``, running statistics included, stays bit-exact.
    """
    if config.reset == "none":
        return None
    channels = apply_reset(model, mask, config).batchnorm_channels
    if channels:
        pairs = fed.ask(statistics_broadcast(model, mask, config), "query.bn_stats", "bn_stats", dropouts=True,
                        what="statistics round")
        write_batchnorm_statistics(model, channels, pool_batchnorm_moments([m for _, m in pairs], channels,
                                                                           senders=[c for c, _ in pairs]))
    return channels


def evaluate_round(fed: Federation, arrays: Mapping[str, Tensor], r: int) -> dict[str, float]:
    """The clients' local accuracy of ``arrays`` on their forget and retain data, weighted by their counts."""
    label = f"evaluate/{r}"
    messages = [fed.message(c, Broadcast(arrays), "evaluate", label) for c in sorted(fed.active)]
    replies = fed.receive(messages, f"evaluation round {r}", dropouts=True)
    by_node = {n: c for c, n in fed.nodes.items()}
    row: dict[str, float] = {"round": r}
    for m in replies:
        fed.traffic.up(label, m.content)
        check_metrics(dict(m.content["metrics"]), f"client {by_node[m.metadata.src_node_id]}", "evaluation reply")
    for split in ("forget", "retain"):
        pairs = [(m.content["metrics"][f"{split}-acc"], m.content["metrics"][f"{split}-examples"])
                 for m in replies if f"{split}-acc" in m.content["metrics"]]
        n = sum(c for _, c in pairs)
        row[f"{split}_acc"] = sum(a * c for a, c in pairs) / n if n else math.nan
    return row


def masked_rounds(
    fed: Federation,
    reference: Mapping[str, Tensor],
    mask: ParameterMask,
    rounds: int,
    config: Mapping[str, Any],
    *,
    statistics: Mapping[str, Tensor] | None = None,
    fraction: float = 1.0,
    seed: int | None = None,
    label: str = "unlearn",
    first_round: int = 0,
    current: Mapping[str, Tensor] | None = None,
    evaluate: bool = False,
    after_round: Callable[[int, dict, list, list], None] | None = None,
    train: ParameterMask | None = None,
) -> tuple[dict[str, Tensor], list[dict], list[dict]]:
    """Masked FedAvg rounds ``first_round .. rounds - 1`` from ``current`` (default: ``reference``); returns the
    global arrays, per-round rows and (``evaluate``) the clients' accuracies after each round.

    Round ``r`` calls the active clients of ``sample_clients(clients, fraction, seed, r)`` (the draw FedAvg
    uses; ``seed`` defaults to ``config["seed"]``). A client gets the mask (channel indices) with its first call
    of this run; it needs no values in round 0 (it holds the deployed model) unless a reset changed them
    (``statistics`` from :func:`remove`: every call then carries the selected slices and statistics). Only the
    selected slices of the round's replies are averaged (by sample count); every other element is copied from
    ``reference``. Clients that do not answer are dropped if ``fed.min_clients`` did. ``after_round(r, current,
    history, evaluation)`` runs after each round (the server checkpoint).

    ``train`` (the head calibration): a sub-mask of ``mask``. Every round then carries ``mask``'s current values
    (round 0 too), clients train only ``train``'s elements (``config["train_rows"]``) and only those are averaged.
    """
    check_rounds(rounds)
    check_fraction(fraction)
    seed = int(config.get("seed", 0)) if seed is None else seed
    reference = {k: v.clone() for k, v in reference.items()}
    current = dict(current) if current is not None else reference
    history: list[dict] = []
    evaluation: list[dict] = []
    has_mask: set[int] = set()
    averaged = mask if train is None else train
    for r in range(first_round, rounds):
        t0, tag = time.perf_counter(), f"{label}/{r}"
        picked = [c for c in (int(i) for i in sample_clients(sorted(fed.nodes), fraction, seed, r)) if c in fed.active]
        down = {send: masked_broadcast(current, mask, config, r, send, statistics, values_always=train is not None)
                for send in (True, False)}
        pairs = fed.ask({c: down[c not in has_mask] for c in picked}, "train.unlearn", tag, dropouts=True,
                        what=f"unlearning round {r}")
        has_mask.update(picked)
        replies = [m for _, m in pairs]
        if not replies and len(picked) == len(fed.nodes):
            raise ValueError("no client has retain data for the masked rounds")
        if replies:
            current = masked_aggregate(reference, averaged, replies, senders=[c for c, _ in pairs])
        else:
            rank_zero_warn(f"masked round {r}: none of the sampled clients {picked} has retain data; the selected "
                           "values stay as they are")
        row = fed.row(r, t0, replies, tag)
        if fraction < 1:
            row["sampled"] = picked
        row["dropped"] = sorted(c for c, what in fed.dropped.items() if what == f"unlearning round {r}")
        history.append(row)
        if evaluate:
            evaluation.append(evaluate_round(fed, current, r))
        if after_round is not None:
            after_round(r, current, history, evaluation)
    if history and not any(row["clients"] for row in history):
        raise ValueError(f"no sampled client had retain data in any of the {rounds} masked rounds "
                         f"(fraction {fraction}); raise the fraction or the rounds")
    return current, history, evaluation


def check_calibration(model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig, classes: Sequence[int],
                      auto: bool) -> UnlearnConfig:
    """Before any removal: ``calibrate="head"`` needs a Linear head whose rows ``classes`` the mask selects. Asked
    explicitly, a model or mask without them fails with one line; asked by ``"auto"`` the calibration is left out
    with a warning (as centrally), and the config without it is returned."""
    if config.calibrate != "head":
        return config
    try:
        name = _head_name(model, mask)
        linear_head(model, name)
        require_rows_in_mask(mask.masks, name, classes)
    except ValueError as err:
        if not auto:
            raise
        rank_zero_warn(f"federated unlearning: no head calibration ({err})")
        return replace(config, calibrate="none")
    return config


def calibration_config(config: UnlearnConfig, rows: Sequence[int]) -> dict[str, Any]:
    """Settings of the calibration rounds: one local epoch of retain data with the module's own optimizer at its own
    rate, only head rows ``rows`` training, BatchNorm statistics fixed. ``max_steps`` (the masked rounds' cap) does
    not apply: a local epoch is the training's (the clients' own Trainer options, as in FedAvg), so the rows get
    the original's schedule (on MNIST, 8 rounds capped at 5 steps relearned the class in 30 steps, 32 rounds in
    55, retraining in 40)."""
    return {"objective": "retain", "epochs": 1, "seed": config.seed, "lr_scale": 1.0,
            "bn_stats": "frozen", "mode": "train", "train_rows": [int(r) for r in rows]}


def calibrate(
    fed: Federation,
    model: torch.nn.Module,
    current: Mapping[str, Tensor],
    mask: ParameterMask,
    config: UnlearnConfig,
    *,
    statistics: Mapping[str, Tensor] | None = None,
    trained_epochs: int | None = None,
    fraction: float = 1.0,
) -> tuple[dict[str, Tensor], list[dict]]:
    """``calibrate="head"`` after the masked rounds, as centrally (:func:`~lightning_unlearn.repair.calibrate_head`):
    re-initialise the forgotten classes' head rows and fit them on retain data, everything else as ``current``.

    1. Head-feature round: every client sends, per forgotten class, the count, sum and sum of squares of the head's
       input on its forget samples of that class (zeros without any); the server pools the mean forget feature.
    2. The server re-initialises the rows (seeded, :func:`~lightning_unlearn.repair.calibration.initial_rows`: a
       row may not start out favouring its class's mean forget feature), a head-only change: no statistics round.
    3. :func:`masked_rounds` that train only those rows on the clients' retain data with their own optimizer, one
       local epoch per round, ``config.calibration_epochs(trained_epochs)`` rounds. ``"auto"`` is the FedAvg
       training's rounds x local epochs when known (the central rule: the original's schedule is how long
       retraining pushes a never-seen class down), else 10. Rounds of one epoch re-average the rows as often as
       FedAvg did: clients with different classes would otherwise pull their rows apart.

    ``model`` (the server's copy) receives ``current`` with the new rows; returns the final arrays and the
    calibration rounds' rows. Every element outside the head rows is ``current``'s, bit for bit.
    """
    classes = sorted(int(c) for c in fed.request.classes) if fed.request is not None else []
    if not classes:
        raise ValueError("calibrate='head' needs a class request; allowed for other requests: calibrate='none'")
    set_arrays(model, current)
    name = _head_name(model, mask)
    head = linear_head(model, name)
    require_rows_in_mask(mask.masks, name, classes)
    values = selected_values(current, mask)
    if statistics is not None:
        values.update(selected_statistics(current, statistics))
    down = Broadcast(values, {"classes": classes}, {k: tuple(v) for k, v in mask.channels.items()})
    pairs = fed.ask(down, "query.head_features", "head_features", dropouts=True, what="head-feature round")
    means = pool_head_features([m for _, m in pairs], classes, head.in_features, senders=[c for c, _ in pairs])
    forget = (torch.stack([means[c] for c in means]), torch.tensor(list(means))) if means else None
    weight, bias = initial_rows(head, classes, config.seed, forget)
    with torch.no_grad():
        head.weight[classes] = weight.to(head.weight.dtype)
        if bias is not None:
            head.bias[classes] = bias.to(head.bias.dtype)
    start = get_arrays(model)
    rows = ParameterMask.from_channels(model, {name: classes}, {})
    rounds = config.calibration_epochs(trained_epochs)
    out, history, _ = masked_rounds(fed, start, mask, rounds, calibration_config(config, classes),
                                    statistics=statistics, fraction=fraction, seed=config.seed, label="calibrate",
                                    train=rows)
    set_arrays(model, out)
    log.info("head calibration: rows %s of %s refit in %d federated round(s)", classes, name, rounds)
    return out, history


def _head_name(model: torch.nn.Module, mask: ParameterMask) -> str | None:
    """The classifier head the server calibrates: the last ``nn.Linear`` of ``model`` (the layer
    :func:`~lightning_unlearn.scoring.layers.discover_layers` marks ``is_head`` on a classifier; the server holds no
    input to run it). None without one (:func:`linear_head` then names what is there)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linear[-1] if linear else None


def federated_unlearn(
    model: pl.LightningModule,
    clients: Any,
    request: ForgetRequest,
    config: UnlearnConfig | None = None,
    *,
    rounds: int = 1,
    fraction: float = 1.0,
    inplace: bool = False,
    trained_epochs: int | None = None,
    **overrides: Any,
) -> FederatedUnlearningResult:
    """Make the federation forget ``request`` by updating only the channels that explain the forget data.

    ``model`` is the deployed global model (the server's copy); clients must hold it too
    (:func:`~lightning_unlearn.federated.fedavg.run_fedavg` deploys it). ``clients``: a
    :class:`~lightning_unlearn.federated.federation.Federation` or a simulation's ``clients``. ``config`` is the
    same :class:`UnlearnConfig` as centrally (``overrides`` replace single fields): ``epochs`` / ``max_steps`` are
    each client's budget per masked round, ``max_samples`` caps each client's scored forget samples, ``layers``
    restricts scoring and selection.

    ``fraction``: share of the clients each masked round calls (a seeded draw per round with ``config.seed``,
    as FedAvg samples). The scoring round and the BatchNorm statistics round after a reset still ask every
    client: the scores and the moments are count-weighted sums over the whole federation's forget / retain
    data, and a sample of them would select (and re-estimate) different channels.

    ``trained_epochs``: the FedAvg training's rounds x local epochs, the length of the head calibration
    (``calibrate="head"``, see :func:`calibrate`) when ``calibrate_epochs="auto"``; None: 10.

    Defaults (``"auto"``, see :data:`~lightning_unlearn.config.AUTO`): retain-only updates, explained channels at
    the user's rate (``lr_scale=1``) and the forgotten classes' head rows at 10x. The head rows are used by no
    other class and must move far (their logit has to lose every argmax); the explained body channels are
    shared with the remaining classes, and a 10x rate on them cost 3-8 points of remaining accuracy.
    """
    check_rounds(rounds)
    check_fraction(fraction)
    asked = UnlearnConfig.build(config, **overrides)
    cfg = asked.resolved(request, "federated")
    fed = as_federation(clients)
    fed.request = request
    work = model if inplace else copy.deepcopy(model)
    t0 = time.perf_counter()
    scores, mask = select(fed, work, cfg)
    cfg = check_calibration(work, mask, cfg, request.classes, auto=asked.calibrate == "auto")
    t1 = time.perf_counter()
    statistics = remove(fed, work, mask, cfg)
    t2 = time.perf_counter()
    current, history, _ = masked_rounds(fed, get_arrays(work), mask, rounds, unlearn_config(cfg),
                                        statistics=statistics, fraction=fraction, seed=cfg.seed)
    set_arrays(work, current)
    t3 = time.perf_counter()
    calibration: list[dict] = []
    if cfg.calibrate == "head":
        current, calibration = calibrate(fed, work, current, mask, cfg, statistics=statistics,
                                         trained_epochs=trained_epochs, fraction=fraction)
    t4 = time.perf_counter()
    timings = {"scoring": t1 - t0, **({"reset": t2 - t1} if cfg.reset != "none" else {}), "unlearning": t4 - t1,
               **({"calibration": t4 - t3} if calibration else {}), "total": t4 - t0}
    extra: dict[str, Any] = {"rounds": rounds, "fraction": fraction}
    if calibration:
        extra.update(calibration_rounds=len(calibration), calibration=calibration)
    return FederatedUnlearningResult(
        work, mask, timings_s=timings, scores=scores, extra=extra,
        method="selective", config=cfg, history=history, traffic=fed.traffic,
        bytes={**round_bytes(history, _total(fed, "score"), _total(fed, "bn_stats")), **calibration_bytes(fed)},
    )


def calibration_bytes(fed: Federation) -> dict[str, int]:
    """Bytes (down + up) of the head calibration: its feature round and all its rounds (empty when it did not run)."""
    features = _total(fed, "head_features")
    rounds = sum(b.total for label, b in fed.traffic.payload.items() if label.startswith("calibrate/"))
    return {"calibration_features": features, "calibration": features + rounds} if features or rounds else {}


def _total(fed: Federation, label: str) -> int:
    b = fed.traffic.payload.get(label)
    return b.total if b is not None else 0
