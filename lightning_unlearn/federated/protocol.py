"""The federated unlearning protocol (Xu et al. 2024) as server phases on any grid: :func:`select`, :func:`remove`,
:func:`masked_rounds` (only the selected slices are averaged: frozen elements stay bit-exact) and :func:`calibrate`,
run in order by :func:`run_unlearning` (for :func:`federated_unlearn` and the ServerApp)."""
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
from flwr.app import RecordDict
from torch import Tensor

from lightning_unlearn.callbacks.divergence import DivergenceError
from lightning_unlearn.config import AUTO, FORGET_AWARE, UnlearnConfig, check_round_cap, federated_round_cap
from lightning_unlearn.federated.checkpoint import ServerCheckpoint
from lightning_unlearn.federated.federation import Federation, as_federation
from lightning_unlearn.federated.messages import ByteCounter, down
from lightning_unlearn.federated.server import (
    aggregate_scores, check_fraction, check_rounds, masked_aggregate, pool_batchnorm_moments, pool_head_features,
    sample_clients, statistic_masks,
)
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays
from lightning_unlearn.repair.stopping import StoppingRule, StopReason
from lightning_unlearn.orchestration import apply_reset, prepare
from lightning_unlearn.repair.calibration import initial_rows, linear_head, require_rows_in_mask
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.scoring.channels import ChannelScores

log = logging.getLogger(__name__)

#: Learning-rate multiplier of the forgotten classes' head rows when ``head_lr_scale="auto"`` (see :data:`AUTO`).
HEAD_LR_SCALE = AUTO["federated"]["head_lr_scale"]
#: Retain batches each client forwards in the statistics round (the central re-estimation's default, too).
STATS_BATCHES = 20
#: Round label of the stopping rule's evaluation rounds (``check/deployed``, ``check/<round>``): booked in the totals.
CHECK = "check/"


@dataclass
class FederatedUnlearningResult(UnlearningResult):
    """An :class:`UnlearningResult` plus bytes and a row per round (``metrics``: the simulation's oracle fills it)."""

    bytes: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    traffic: ByteCounter | None = None  # payload and wire bytes per round label


def round_bytes(history: Sequence[Mapping[str, Any]], traffic: ByteCounter | None = None,
                scoring: str = "score") -> dict[str, float]:
    """Bytes per round (mean and max, down + up) and in total, with the payload ``traffic`` booked for the
    ``scoring`` rounds and, where they ran, the statistics round, the stopping rule's checks and the calibration."""
    def paid(prefix: str) -> int:
        return sum(b.total for label, b in (traffic.payload if traffic else {}).items() if label.startswith(prefix))

    per, extra, statistics = [r["bytes_down"] + r["bytes_up"] for r in history], paid(scoring), paid("bn_stats")
    checks = paid(CHECK)
    out = {"scoring": extra, "unlearning_round": sum(per) / len(per), "unlearning_round_max": max(per),
           "total": extra + statistics + checks + sum(per)}
    if statistics:
        out["statistics"] = statistics
    if checks:
        out["checks"] = checks
    features, calibrating = paid("head_features"), paid("calibrate/")
    if features or calibrating:
        out.update(calibration_features=features, calibration=features + calibrating)
    return out


def unlearn_config(config: UnlearnConfig) -> dict[str, Any]:
    """The masked rounds' settings as sent to the clients (``config`` resolved; no ``head_lr_scale``: ``lr_scale``)."""
    if "auto" in (config.objective, config.head_lr_scale):
        raise ValueError("unlearn_config needs a resolved UnlearnConfig (call config.resolved(request, 'federated'))")
    out = {"objective": config.objective, "epochs": config.epochs, "max_steps": config.max_steps, "seed": config.seed,
           "forget_weight": config.forget_weight, "lr_scale": config.lr_scale, "bn_stats": config.bn_stats,
           "mode": "train"}
    return out if config.head_lr_scale is None else {**out, "head_lr_scale": config.head_lr_scale}


def round_config(config: Mapping[str, Any], r: int) -> dict[str, Any]:
    return {**config, "seed": int(config.get("seed", 0)) * 1_000 + r}


def masked_down(arrays: Mapping[str, Tensor], mask: ParameterMask, config: Mapping[str, Any],
                statistics: Mapping[str, Tensor] | None = None, values: bool = True,
                channels: bool = True) -> RecordDict:
    """A down message of the selected slices (``values``; always after a reset: ``statistics``), the selected
    BatchNorm channels' ``statistics`` and the mask's ``channels``."""
    out = selected_values(arrays, mask) if values or statistics is not None else {}
    out.update({k: arrays[k][sel].clone() for k, sel in statistic_masks(statistics or {}).items()})
    return down(out, config, mask.channels if channels else None)


# -- phases ------------------------------------------------------------------------------------------------------
def select(fed: Federation, model: torch.nn.Module, config: UnlearnConfig) -> tuple[ChannelScores, ParameterMask]:
    """Scoring round (every client: a sample would select other channels), then the shared selection on ``model``."""
    settings = {"method": config.method, "max_samples": config.max_samples, "contrast": config.contrast,
                "seed": config.seed, "layers": config.layers}
    replies = fed.ask(down({}, settings), "query.score", "score")
    if not replies:
        raise ValueError("no client holds data to forget: nothing to score")
    scores = aggregate_scores(replies, model=model)
    return scores, prepare(model, scores, config)


def remove(fed: Federation, model: torch.nn.Module, mask: ParameterMask,
           config: UnlearnConfig) -> dict[str, Tensor] | None:
    """``config.reset`` on the selected slices of ``model``, then a statistics round pools the clients' retain moments
    into the selected BatchNorm channels. Returns those channels (name -> bool vector), None without a reset."""
    if config.reset == "none":
        return None
    channels = apply_reset(model, mask, config).batchnorm_channels
    if channels:
        content = masked_down(get_arrays(model), mask, {"seed": config.seed, "max_batches": STATS_BATCHES})
        replies = fed.ask(content, "query.bn_stats", "bn_stats", dropouts=True, what="statistics round")
        for bn, (mean, var) in pool_batchnorm_moments(replies, channels).items():  # into the selected channels only
            module = model.get_submodule(bn)
            sel = channels[bn].to(module.running_mean.device)
            module.running_mean[sel] = mean.to(module.running_mean)
            module.running_var[sel] = var.to(module.running_var)
    return channels


def per_client(clients: Sequence[int], holders: set[int],
               build: Callable[[bool], RecordDict]) -> dict[int, RecordDict]:
    """Each client's message, each variant built once: ``build(True)`` (with the mask) for a client not in
    ``holders``, ``build(False)`` for the others; ``holders`` then holds them all (the mask is sent once)."""
    variants = {send: build(send) for send in {c not in holders for c in clients}}
    out = {c: variants[c not in holders] for c in clients}
    holders.update(clients)
    return out


def evaluate_round(fed: Federation, arrays: Mapping[str, Tensor] | None, r: int | str,
                   mask: ParameterMask | None = None, statistics: Mapping[str, Tensor] | None = None,
                   holders: set[int] | None = None, label: str = "evaluate/",
                   settings: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The clients' local accuracy of ``arrays`` on their forget and retain data, weighted by their counts. With a
    ``mask`` only the selected values (and ``statistics``) travel, the nodes rebuild the rest from the deployed model,
    and the mask goes to the clients not in ``holders`` (updated); ``arrays=None``: the deployed model, nothing sent.
    ``settings``: e.g. ``max_samples`` and ``seed`` of each client's seeded subsample."""
    config = {**(settings or {}), "base": "deployed"}
    if arrays is None:
        contents: RecordDict | dict[int, RecordDict] = down({}, config)
    elif mask is None:
        contents = down(arrays, settings)
    else:
        contents = per_client(sorted(fed.active), set() if holders is None else holders,
                              lambda send: masked_down(arrays, mask, config, statistics, channels=send))
    replies = fed.ask(contents, "evaluate", f"{label}{r}", dropouts=True, what=f"evaluation round {r}")
    row: dict[str, float] = {"round": r}
    for split in ("forget", "retain"):
        pairs = [(m.metrics[f"{split}-acc"], m.metrics[f"{split}-examples"]) for m in replies
                 if f"{split}-acc" in m.metrics]
        n = sum(c for _, c in pairs)
        row[f"{split}_acc"] = sum(a * c for a, c in pairs) / n if n else math.nan
    return row


def masked_rounds(
    fed: Federation, reference: Mapping[str, Tensor], mask: ParameterMask, rounds: int, config: Mapping[str, Any], *,
    statistics: Mapping[str, Tensor] | None = None, fraction: float = 1.0, label: str = "unlearn",
    first_round: int = 0, after_round: Callable[[int, dict, list], bool | None] | None = None,
    train: ParameterMask | None = None, holders: set[int] | None = None,
) -> tuple[dict[str, Tensor], list[dict]]:
    """Masked FedAvg rounds ``first_round .. rounds - 1`` from ``reference``: the global arrays and a row per round.
    Round ``r`` calls the active clients of FedAvg's draw ``sample_clients(.., fraction, config["seed"], r)``; the
    server averages the selected slices (``train``: only this sub-mask) by sample count, every other element is
    ``reference``'s. ``after_round(r, current, history)``: evaluation and checkpoint; a true return stops the rounds.
    ``holders``: the clients that hold the mask (updated: sent once per client)."""
    check_rounds(rounds)
    check_fraction(fraction)
    seed = int(config.get("seed", 0))
    current = reference = {k: v.clone() for k, v in reference.items()}
    history: list[dict] = []
    has_mask: set[int] = set() if holders is None else holders
    for r in range(first_round, rounds):
        t0, tag = time.perf_counter(), f"{label}/{r}"
        picked = [c for c in (int(i) for i in sample_clients(sorted(fed.nodes), fraction, seed, r)) if c in fed.active]
        # no values in round 0 (clients hold the deployed model) unless a reset changed them or rows are calibrated;
        # the mask goes only to clients that do not hold it yet, and each variant is packed only if one is sent
        contents = per_client(picked, has_mask, lambda send: masked_down(
            current, mask, round_config(config, r), statistics, r > 0 or train is not None, send))
        try:
            replies = fed.ask(contents, "train.unlearn", tag, dropouts=True, what=f"unlearning round {r}")
        except DivergenceError as err:  # an in-process client's (a deployed one's error reply names the round)
            raise DivergenceError(err.step, err.loss, f"unlearning round {r}: {err}") from None
        if not replies and len(picked) == len(fed.nodes):
            raise ValueError("no client has retain data for the masked rounds")
        if replies:
            current = masked_aggregate(reference, mask if train is None else train, replies)
        else:
            rank_zero_warn(f"masked round {r}: none of the sampled clients {picked} has retain data; the selected "
                           "values stay as they are")
        row = fed.row(r, t0, replies, tag)
        if fraction < 1:
            row["sampled"] = picked
        row["dropped"] = sorted(c for c, what in fed.dropped.items() if what == f"unlearning round {r}")
        history.append(row)
        if after_round is not None and after_round(r, current, history):
            break
    if history and not any(row["clients"] for row in history):
        raise ValueError(f"no sampled client had retain data in any of the {rounds} masked rounds "
                         f"(fraction {fraction}); raise the fraction or the rounds")
    return current, history


def _head_name(model: torch.nn.Module) -> str | None:
    """The last ``nn.Linear`` (the server has no input to find the head by); None without one."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return linear[-1] if linear else None


def check_calibration(model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig, classes: Sequence[int],
                      auto: bool) -> UnlearnConfig:
    """Before any removal: ``calibrate="head"`` needs a Linear head whose rows ``classes`` the mask selects. Asked
    explicitly, fail with one line; by ``"auto"``, warn and return the config without calibration (as centrally)."""
    if config.calibrate != "head":
        return config
    try:
        name = _head_name(model)
        linear_head(model, name)
        require_rows_in_mask(mask.masks, name, classes)
    except ValueError as err:
        if not auto:
            raise
        rank_zero_warn(f"federated unlearning: no head calibration ({err})")
        return replace(config, calibrate="none")
    return config


def calibrate(
    fed: Federation, model: torch.nn.Module, mask: ParameterMask, config: UnlearnConfig, *,
    statistics: Mapping[str, Tensor] | None = None, trained_epochs: int | None = None, fraction: float = 1.0,
) -> tuple[dict[str, Tensor], list[dict]]:
    """``calibrate="head"`` as centrally: the server re-initialises the forgotten classes' rows from the pooled mean
    forget features, then ``config.calibration_epochs(trained_epochs)`` one-epoch masked rounds train only those rows
    (re-averaged as often as FedAvg did), from ``model``'s arrays and into them; returns the arrays and rows."""
    classes = sorted(int(c) for c in fed.request.classes)  # a class request: the config and check_calibration said
    name = _head_name(model)
    head = linear_head(model, name)
    replies = fed.ask(masked_down(get_arrays(model), mask, {"classes": classes}, statistics), "query.head_features",
                    "head_features", dropouts=True, what="head-feature round")
    means = pool_head_features(replies, classes, head.in_features)
    forget = (torch.stack([means[c] for c in means]), torch.tensor(list(means))) if means else None
    weight, bias = initial_rows(head, classes, config.seed, forget)
    with torch.no_grad():
        head.weight[classes] = weight.to(head.weight.dtype)
        if bias is not None:
            head.bias[classes] = bias.to(head.bias.dtype)
    rounds = config.calibration_epochs(trained_epochs)
    # one local epoch at the module's own rate, BatchNorm fixed; ``max_steps`` (the masked rounds' cap) does not apply
    settings = {"objective": "retain", "epochs": 1, "seed": config.seed, "lr_scale": 1.0, "bn_stats": "frozen",
                "mode": "train", "train_rows": classes}
    out, history = masked_rounds(fed, get_arrays(model), mask, rounds, settings, statistics=statistics,
                                 fraction=fraction, label="calibrate",
                                 train=ParameterMask.from_channels(model, {name: classes}, {}))
    set_arrays(model, out)
    log.info("head calibration: rows %s of %s refit in %d federated round(s)", classes, name, rounds)
    return out, history


def run_unlearning(
    fed: Federation, model: torch.nn.Module, request: ForgetRequest, config: UnlearnConfig, rounds: int | str = "auto",
    *, auto: bool = False, fraction: float = 1.0, trained_epochs: int | None = None, evaluate: bool = False,
    checkpoint: ServerCheckpoint | None = None,
) -> FederatedUnlearningResult:
    """Select, remove, masked rounds and calibration on ``model`` (holding the deployed arrays; updated in place).
    ``config`` is resolved (``auto``: it asked ``calibrate="auto"``). ``rounds``: the masked rounds' cap under
    ``config.early_stopping`` after a removal (:func:`removes`), else their number
    (:func:`~lightning_unlearn.config.federated_round_cap`).
    ``checkpoint`` (the ServerApp's) is rewritten after the selection and every round; one holding a mask is resumed.
    ``evaluate``: clients' accuracies in extra."""
    watch = config.early_stopping and removes(config)
    cap = federated_round_cap(rounds, watch, trained_epochs)
    stopping = watch and cap > 1  # one round: nothing to decide, no check paid
    ck = checkpoint or ServerCheckpoint()
    fed.request = request
    fed.start_run()
    t0 = time.perf_counter()
    resumed = ck.mask is not None
    scores, mask = (None, ck.mask) if resumed else select(fed, model, config)
    cfg = check_calibration(model, mask, config, request.classes, auto)
    t1 = time.perf_counter()
    rule = None
    if resumed:  # the saved arrays hold the reset and its statistics, the rule its checks
        log.info("resuming unlearning at round %d with the checkpoint's mask (sha256 %s)", ck.rounds_done,
                 mask.sha256()[:12])
        set_arrays(model, ck.current)
        if stopping:
            if ck.stopping is None:
                raise ValueError("the server checkpoint holds no stopping-rule state (written without it, e.g. by an "
                                 "earlier version); start fresh (resume=False, --federated.fresh true) or pass "
                                 "early_stopping=False")
            rule = repair_rule(cfg, ck.stopping["deployed"])
            rule.load_state_dict(ck.stopping["rule"])
    else:
        state = None
        if stopping:  # the deployed model's accuracies, before the reset changes them: what the repair restores
            deployed = evaluate_round(fed, None, "deployed", label=CHECK, settings=check_settings(cfg))
            rule = repair_rule(cfg, deployed)
            state = {"deployed": deployed, "rule": rule.state_dict()}
        remove(fed, model, mask, cfg)
        ck.update(mask=mask, rounds_done=0, current=get_arrays(model), stopping=state)
    statistics = selected_batchnorm_channels(model, mask) if cfg.reset != "none" else None  # what remove() pooled
    t2 = time.perf_counter()
    log.info("request %s, scoring %s, ratio %g (%s); %s masked round(s), objective %s, max_steps %s",
             request.to_dict(), cfg.method, cfg.ratio, cfg.scope, f"at most {cap}" if stopping else cap,
             cfg.objective, cfg.max_steps)
    history, evaluation = list(ck.unlearning), list(ck.evaluation)
    holders: set[int] = set()  # clients holding the mask: masked rounds and checks send it once

    def after_round(r: int, arrays: dict, rows: list) -> bool:
        reason = None
        if evaluate or stopping:  # one evaluation round serves both
            row = evaluate_round(fed, arrays, r, mask, statistics, holders, CHECK if stopping else "evaluate/",
                                 check_settings(cfg) if stopping else None)
            evaluation.append(row)
            if rule is not None:
                reason = rule.update(r, row["forget_acc"], math.nan, row["retain_acc"])
                rows[-1].update(retain_acc=row["retain_acc"], forget_acc=row["forget_acc"], stop=_stop_name(reason))
        ck.update(rounds_done=r + 1, current=arrays, unlearning=history + rows, evaluation=list(evaluation),
                  stopping=None if rule is None else {**ck.stopping, "rule": rule.state_dict()})
        return reason is not None

    stopped = rule is not None and bool(rule.history) and rule.history[-1].reason is not None
    # masked_aggregate copies the frozen values from the reference: the deployed ones, whatever rounds ran
    current, rows = (ck.current, []) if stopped else masked_rounds(
        fed, ck.current, mask, cap, unlearn_config(cfg), statistics=statistics, fraction=fraction,
        first_round=ck.rounds_done, after_round=after_round, holders=holders)
    history += rows
    set_arrays(model, current)
    t3 = time.perf_counter()
    extra: dict[str, Any] = {"rounds": len(history), "round_cap": cap, "fraction": fraction}
    if rule is not None:
        checks = [{**c, "reason": c["reason"] and _stop_name(StopReason(c["reason"]))} for c in rule.rows()]
        extra.update(deployed=dict(ck.stopping["deployed"]), checks=checks,
                     stop_reason=history[-1].get("stop") or "round cap")
        log.info("repair: %d of at most %d masked round(s), stopped by %s (retain accuracy %.4f, deployed %.4f)",
                 len(history), cap, extra["stop_reason"], rule.history[-1].remaining_acc, rule.reference)
    if cfg.calibrate == "head":  # after a restart it runs again from the saved arrays: seeded, the same result
        current, calibration = calibrate(fed, model, mask, cfg, statistics=statistics, trained_epochs=trained_epochs,
                                         fraction=fraction)
        extra.update(calibration_rounds=len(calibration), calibration=calibration)
        if evaluate:  # the last evaluation is the calibrated model's
            evaluation.append(evaluate_round(fed, current, len(history), mask, statistics, holders))
    if evaluate:
        extra["evaluation"] = evaluation
    t4 = time.perf_counter()
    timings = {"scoring": t1 - t0, **({"reset": t2 - t1} if cfg.reset != "none" else {}), "unlearning": t4 - t1,
               **({"calibration": t4 - t3} if "calibration" in extra else {}), "total": t4 - t0}
    return FederatedUnlearningResult(model, mask, timings_s=timings, scores=scores, extra=extra, config=cfg,
                                     history=history, traffic=fed.run, bytes=round_bytes(history, fed.run))


def removes(config: UnlearnConfig) -> bool:
    """Whether the repair starts from a damaged model (a reset, or a forget term on the way): only then do the
    masked rounds have a retain accuracy to recover and the stopping rule anything to watch."""
    return not (isinstance(config.reset, str) and config.reset == "none") or config.objective in FORGET_AWARE


def _stop_name(reason: StopReason | None) -> str | None:
    """``"recovered"`` or ``"plateau"`` (the central rule's RECOVERED names the central calibration)."""
    return None if reason is None else "recovered" if reason is StopReason.RECOVERED else reason.value


def check_settings(config: UnlearnConfig) -> dict[str, int]:
    """A check's seeded subsample: at most ``check_samples`` of each client's retain (and forget) data, the same
    samples in every check of a run (the deployed model and each round are compared on them)."""
    return {"max_samples": config.check_samples, "seed": config.seed}


def repair_rule(config: UnlearnConfig, deployed: Mapping[str, float]) -> StoppingRule:
    """The central stopping rule on the clients' retain accuracy: recovered within ``stop_tolerance`` of the
    ``deployed`` model's, or ``patience`` checks without a new best. Forgetting is the reset's and calibration's
    (the server has no retrained model's forget accuracy to aim at): the rule stops on recovery alone."""
    return StoppingRule(deployed["retain_acc"], config.stop_tolerance, config.patience, forgetting_deferred=True)


def federated_unlearn(
    model: pl.LightningModule, clients: Any, request: ForgetRequest, config: UnlearnConfig | None = None, *,
    rounds: int | str = "auto", fraction: float = 1.0, inplace: bool = False, trained_epochs: int | None = None,
    **overrides: Any,
) -> FederatedUnlearningResult:
    """Make the federation forget ``request`` by updating only the channels that explain the forget data.

    ``model``: the deployed global model (the clients hold it too, as ``run_fedavg`` leaves it). ``clients``: a
    ``Federation`` or a simulation's ``clients``. ``config``: the same :class:`UnlearnConfig` as centrally
    (``overrides`` replace fields); ``epochs`` / ``max_steps`` are each client's budget per masked round.
    ``rounds``: masked rounds; after a removal (a reset or a forget term) and under ``early_stopping`` (the default)
    their cap: the rounds stop once the clients' retain accuracy is back within ``stop_tolerance`` of the deployed
    model's (or after ``patience`` rounds without a new best); ``"auto"``:
    :func:`~lightning_unlearn.config.federated_round_cap` (one round when nothing was removed).
    ``fraction``: share of the clients each masked round calls (scoring and statistics rounds ask every client).
    ``trained_epochs``: FedAvg's rounds x local epochs: the calibration's length for ``calibrate_epochs="auto"`` and
    the round cap's for ``rounds="auto"``.
    """
    check_round_cap(rounds)
    check_fraction(fraction)
    asked = UnlearnConfig.build(config, **overrides)
    cfg = asked.resolved(request, "federated")
    return run_unlearning(as_federation(clients), model if inplace else copy.deepcopy(model), request, cfg, rounds,
                   auto=asked.calibrate == "auto", fraction=fraction, trained_epochs=trained_epochs)
