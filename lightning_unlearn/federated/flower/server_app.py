"""The Flower ``ServerApp``: one ``run_server(grid, ...)`` that composes the protocol's phases.

FedAvg (:func:`~lightning_unlearn.federated.fedavg.run_fedavg`: Flower's FedAvg with the library's sampling and
exact aggregation) -> deploy -> :func:`~lightning_unlearn.federated.protocol.select` (scoring round and the
shared selection) -> :func:`~lightning_unlearn.federated.protocol.remove` (reset and statistics round) ->
:func:`~lightning_unlearn.federated.protocol.masked_rounds`. The same function runs on a deployment's grid
and on a :class:`~lightning_unlearn.federated.grid.LocalGrid` in process. Client failures stop the run with
the client's reason: Flower's own strategies would log them and go on with fewer clients, which for unlearning
means silently different results. A client that *disconnects* (no reply within ``UnlearnPlan.round_timeout``,
or the SuperLink reports its node unavailable) is dropped from the masked rounds only if at least
``UnlearnPlan.min_clients`` replied; otherwise the run stops and says which clients are missing.
``run_server(checkpoint=...)`` writes a :class:`~lightning_unlearn.federated.flower.checkpoint.ServerCheckpoint`
after every stage, so a restarted server resumes with the same mask.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from lightning_unlearn._io import save_torch, write_json
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.evidence.report import UnlearningReport, weights_sha256
from lightning_unlearn.federated.fedavg import DATA_CHOICES, deploy_model, run_fedavg
from lightning_unlearn.federated.federation import POLL_S, Federation
from lightning_unlearn.federated.flower.checkpoint import ServerCheckpoint, plan_key
from lightning_unlearn.federated.messages import ByteCounter, RoundBytes
from lightning_unlearn.federated.protocol import (
    calibrate, check_calibration, evaluate_round, masked_rounds, remove, select, unlearn_config,
)
from lightning_unlearn.federated.server import check_rounds
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.scoring.channels import ChannelScores

log = logging.getLogger(__name__)


@dataclass
class FedAvgPlan:
    """The FedAvg schedule (same meaning and defaults as :func:`run_fedavg`)."""

    rounds: int = 3
    local_epochs: int = 1
    fraction: float = 1.0
    seed: int = 0
    data: str = "all"
    local_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rounds(self.rounds)
        check_rounds(self.local_epochs, "local_epochs")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.data not in DATA_CHOICES:
            raise ValueError(f"unknown data {self.data!r}; allowed values are {list(DATA_CHOICES)}")


class UnlearnPlan:
    """One unlearning request: the same :class:`~lightning_unlearn.UnlearnConfig` as :func:`federated_unlearn`,
    plus the number of masked ``rounds``.

    ``overrides`` replace single config fields (``UnlearnPlan(request, ratio=0.2)``). ``evaluate``: after
    each masked round, clients report their local forget/retain accuracy.

    Dropouts: ``min_clients`` (default: every client) is how many clients must answer each masked
    round; ``round_timeout`` (seconds, default: the run's timeout) is how long the server waits for
    the rest. A client that does not answer in time is left out of that and later rounds when at
    least ``min_clients`` answered; with fewer the run stops naming the missing clients.
    """

    def __init__(self, request: ForgetRequest, config: UnlearnConfig | None = None, rounds: int = 1,
                 evaluate: bool = True, min_clients: int | None = None, round_timeout: float | None = None,
                 **overrides: Any) -> None:
        if not isinstance(request, ForgetRequest):
            raise TypeError(f"request must be a ForgetRequest, got {type(request).__name__}")
        check_rounds(rounds)
        if min_clients is not None and (isinstance(min_clients, bool) or not isinstance(min_clients, int)
                                        or min_clients < 1):
            raise ValueError(f"min_clients must be an integer >= 1 or None (every client), got {min_clients!r}")
        if round_timeout is not None and not (isinstance(round_timeout, (int, float)) and round_timeout > 0):
            raise ValueError(f"round_timeout must be a number of seconds > 0 or None, got {round_timeout!r}")
        self.request, self.rounds, self.evaluate = request, rounds, evaluate
        self.min_clients, self.round_timeout = min_clients, round_timeout
        asked = UnlearnConfig.build(config, **overrides)
        self.config = asked.resolved(request, "federated")
        self.calibrate_auto = asked.calibrate == "auto"  # "auto" leaves out a calibration the mask cannot take

    def key(self) -> str:
        """What a server checkpoint must match to be resumed: request, settings, rounds."""
        return plan_key(self.request.to_dict(), self.config.to_dict(), self.rounds)

    def __repr__(self) -> str:
        return (f"UnlearnPlan(request={self.request.to_dict()}, rounds={self.rounds}, min_clients={self.min_clients}, "
                f"round_timeout={self.round_timeout}, config={self.config})")


@dataclass
class FlowerRunResult:
    """What a Flower run produced: models, mask, per-round rows and bytes (payload and wire)."""

    arrays: dict[str, Tensor] = field(default_factory=dict)  # the final global model
    trained: dict[str, Tensor] = field(default_factory=dict)  # the deployed model (before unlearning)
    clients: dict[int, int] = field(default_factory=dict)  # client id -> Flower node id
    training: list[dict] = field(default_factory=list)
    scores: ChannelScores | None = None
    mask: ParameterMask | None = None
    unlearning: list[dict] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)
    traffic: ByteCounter = field(default_factory=ByteCounter)
    timings_s: dict[str, float] = field(default_factory=dict)
    plan: UnlearnPlan | None = None
    dropped: dict[int, str] = field(default_factory=dict)  # client id -> the round it dropped out in
    resumed: dict[str, Any] = field(default_factory=dict)  # what a restarted server took from its checkpoint
    calibration: list[dict] = field(default_factory=list)  # the head calibration's rounds (calibrate="head")

    def round_bytes(self, prefix: str, wire: bool = False) -> list[RoundBytes]:
        """Bytes of every round whose label starts with ``prefix`` (``"fedavg/"``, ``"unlearn/"``, ``"score"``)."""
        book = self.traffic.wire if wire else self.traffic.payload
        return [b for label, b in book.items() if label.startswith(prefix)]

    def report(self) -> UnlearningReport:
        """The same :class:`UnlearningReport` the in-process engines write; metrics are the clients' own."""
        if self.plan is None:
            raise ValueError("this Flower run did not unlearn (no UnlearnPlan): there is nothing to report")
        unlearned = self.evaluation[-1] if self.evaluation else {}
        return UnlearningReport(
            request=self.plan.request.to_dict(), method=self.plan.config.method,
            params={**self.plan.config.to_dict(), "engine": "flower", "rounds": self.plan.rounds},
            seed=self.plan.config.seed, original_sha256=weights_sha256(self.trained),
            unlearned_sha256=weights_sha256(self.arrays),
            metrics={"unlearned": {k: v for k, v in unlearned.items() if k != "round"}},
            timings_s=dict(self.timings_s), mask=UnlearningReport.mask_summary(self.mask),
            bytes_moved=self.traffic.as_dict(),
            extra={"clients": self.clients, "training": self.training, "unlearning": self.unlearning,
                   "evaluation": self.evaluation, "dropped": self.dropped, "resumed": self.resumed},
        )



# -- the run -------------------------------------------------------------------------------------------------------
def unlearn_phases(fed: Federation, model: pl.LightningModule, plan: UnlearnPlan, deployed: Mapping[str, Tensor],
                   result: FlowerRunResult, checkpoint: "_Checkpointer | None" = None,
                   trained_epochs: int | None = None) -> dict[str, Tensor]:
    """Select the mask and remove (or take both from ``checkpoint``), then the masked rounds and, for
    ``calibrate="head"``, the head calibration (:func:`~lightning_unlearn.federated.protocol.calibrate`, the same
    function :func:`~lightning_unlearn.federated.federated_unlearn` runs; ``trained_epochs``: FedAvg rounds x
    local epochs, its length when ``calibrate_epochs="auto"``); returns the arrays."""
    cfg, state = plan.config, checkpoint.state if checkpoint is not None else None
    fed.request = plan.request
    set_arrays(model, deployed)
    statistics, first, history, evaluation = None, 0, [], []
    if state is not None and state.mask is not None:
        mask, first = state.mask, state.rounds_done
        history, evaluation = list(state.unlearning), list(state.evaluation)
        log.info("resuming unlearning at round %d with the checkpoint's mask (sha256 %s)", first, mask.sha256()[:12])
        cfg = check_calibration(model, mask, cfg, plan.request.classes, plan.calibrate_auto)
        if cfg.reset != "none" and state.current is None:  # stopped before the reset was saved: redo it (seeded)
            statistics = remove(fed, model, mask, cfg)
        elif cfg.reset != "none":  # the saved arrays hold the reset (and its statistics) outside the trained slices
            set_arrays(model, state.current)
            statistics = selected_batchnorm_channels(model, mask)
        current = dict(state.current) if state.current is not None else get_arrays(model)
    else:
        result.scores, mask = select(fed, model, cfg)
        cfg = check_calibration(model, mask, cfg, plan.request.classes, plan.calibrate_auto)
        statistics = remove(fed, model, mask, cfg)
        current = get_arrays(model)
        if checkpoint is not None:
            checkpoint.update(mask=mask, rounds_done=0, current=current if cfg.reset != "none" else None)
    result.mask = mask
    log.info("request %s, scoring %s, ratio %g (%s); %d masked round(s), objective %s, max_steps %s",
             plan.request.to_dict(), cfg.method, cfg.ratio, cfg.scope, plan.rounds, cfg.objective, cfg.max_steps)

    def saved(r: int, arrays: dict, rows: list, evals: list) -> None:
        checkpoint.update(rounds_done=r + 1, current=arrays, unlearning=history + rows, evaluation=evaluation + evals)

    reference = current if cfg.reset != "none" else dict(deployed)  # masked_aggregate copies frozen values from it
    arrays, rows, evals = masked_rounds(fed, reference, mask, plan.rounds, unlearn_config(cfg), statistics=statistics,
                                        first_round=first, current=current, evaluate=plan.evaluate,
                                        after_round=saved if checkpoint is not None else None)
    result.unlearning, result.evaluation = history + rows, evaluation + evals
    if cfg.calibrate == "head":  # after a restart it runs again from the saved arrays: seeded, the same result
        arrays, result.calibration = calibrate(fed, model, arrays, mask, cfg, statistics=statistics,
                                               trained_epochs=trained_epochs)
        if plan.evaluate:  # the report's accuracies are the last evaluation's: the calibrated model's
            result.evaluation.append(evaluate_round(fed, arrays, plan.rounds))
    return arrays


def run_server(
    grid: Grid,
    model: pl.LightningModule,
    num_clients: int,
    train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None,
    timeout: float = 3600,
    checkpoint: str | os.PathLike | None = None,
    poll_s: float | None = POLL_S,
) -> FlowerRunResult:
    """FedAvg from ``model``'s arrays (skipped when ``train`` is None), deploy, then unlearn (when asked).

    ``checkpoint``: a folder for the :class:`ServerCheckpoint`; a restarted run with the same plans
    resumes from it (no retraining, the same mask, the next masked round). ``poll_s``: how often to
    ask the SuperLink for replies (None: the grid's own ``send_and_receive``, 3 s in a deployment).
    """
    result = FlowerRunResult(plan=unlearn)
    saver = _Checkpointer(checkpoint, plan_key(train.__dict__ if train else None, unlearn.key() if unlearn else None,
                                               num_clients)) if checkpoint is not None else None
    state = saver.state if saver is not None else None
    t0 = time.perf_counter()
    fed = Federation(grid, num_clients, timeout, unlearn.min_clients if unlearn else None,
                     unlearn.round_timeout if unlearn else None, poll_s)
    result.clients, result.traffic = dict(fed.nodes), fed.traffic
    arrays = get_arrays(model)
    t1 = time.perf_counter()
    if state is not None and state.trained is not None:
        arrays, result.training = {k: v.clone() for k, v in state.trained.items()}, list(state.training)
        result.resumed = {"trained": True, "mask": state.mask is not None, "rounds_done": state.rounds_done}
        log.info("resuming from checkpoint %s: %s", checkpoint, result.resumed)
    elif train is not None:
        out = run_fedavg(model, fed, train.rounds, train.fraction, train.local_epochs, train.seed, train.data,
                         local_config=train.local_config, deploy=False)
        arrays, result.training = get_arrays(model), out.history
    t2 = time.perf_counter()
    result.trained = {k: v.clone() for k, v in arrays.items()}
    if saver is not None and (state is None or state.trained is None):
        saver.update(trained=result.trained, training=result.training)
    deploy_model(fed, arrays)
    t3 = time.perf_counter()
    if unlearn is not None:
        arrays = unlearn_phases(fed, model, unlearn, arrays, result, saver,
                                train.rounds * train.local_epochs if train is not None else None)
        result.dropped = dict(fed.dropped)
    t4 = time.perf_counter()
    set_arrays(model, arrays)
    result.arrays = arrays
    result.timings_s = {"connect": t1 - t0, "training": t2 - t1, "deploy": t3 - t2, "unlearning": t4 - t3,
                        "total": t4 - t0}
    return result


class _Checkpointer:
    """Holds the run's :class:`ServerCheckpoint` (loaded if one exists for this plan) and rewrites it."""

    def __init__(self, folder: str | os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        self.state = ServerCheckpoint.load(self.folder, key)
        self._current = self.state or ServerCheckpoint(key)

    def update(self, **fields: Any) -> None:
        self._current.__dict__.update(fields)
        self._current.save(self.folder)


def save_result(result: FlowerRunResult, out_dir: str | os.PathLike) -> Path:
    """``model.pt`` (final arrays), ``trained.pt`` and (after unlearning) ``mask.pt`` and ``report.json``, an
    :class:`UnlearningReport`, under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    for name, arrays in (("model.pt", result.arrays), ("trained.pt", result.trained)):
        save_torch(arrays, out / name)
    if result.mask is not None:
        result.mask.save(out / "mask.pt")
    if result.plan is not None:
        write_json(result.report().to_dict(), out / "report.json")
    return out


def make_server_app(
    model_fn: Callable[[], pl.LightningModule],
    num_clients: int,
    train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None,
    sink: FlowerRunResult | None = None,
    out_dir: str | os.PathLike | None = None,
    timeout: float = 3600,
) -> ServerApp:
    """A ServerApp running :func:`run_server`; results go to ``sink`` (same process) and/or ``out_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, model_fn(), num_clients, train, unlearn, timeout)
        if sink is not None:
            sink.__dict__.update(result.__dict__)
        if out_dir is not None:
            save_result(result, out_dir)

    return app


__all__ = ["FedAvgPlan", "FlowerRunResult", "UnlearnPlan", "make_server_app", "run_server", "save_result",
           "unlearn_phases"]
