"""The Flower ``ServerApp``: FedAvg, deploy, then the protocol's ``run_unlearning``, on a deployment's grid or an
in-process LocalGrid. A client that fails stops the run with its reason; one that does not answer in time is
dropped while ``min_clients`` still answer."""
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
from lightning_unlearn.config import UnlearnConfig, check_round_cap
from lightning_unlearn.evidence.references import cache_key
from lightning_unlearn.evidence.report import UnlearningReport, weights_sha256
from lightning_unlearn.federated.fedavg import check_fedavg, deploy_model, run_fedavg
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.checkpoint import ServerCheckpoint
from lightning_unlearn.federated.messages import ByteCounter
from lightning_unlearn.federated.protocol import run_unlearning
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.request import ForgetRequest
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
        check_fedavg(self.rounds, self.local_epochs, self.fraction, self.data)


class UnlearnPlan:
    """One request: the same :class:`~lightning_unlearn.UnlearnConfig` as ``federated_unlearn`` (``overrides``
    replace fields), ``rounds`` masked rounds as in ``federated_unlearn`` (under ``early_stopping`` their cap;
    ``"auto"``: a share of the FedAvg plan's rounds), ``evaluate``: the clients' accuracies after each round. Dropouts:
    ``min_clients`` (default: all) must answer each masked round within ``round_timeout`` s (default: the run's)."""

    def __init__(self, request: ForgetRequest, config: UnlearnConfig | None = None, rounds: int | str = "auto",
                 evaluate: bool = True, min_clients: int | None = None, round_timeout: float | None = None,
                 **overrides: Any) -> None:
        if not isinstance(request, ForgetRequest):
            raise TypeError(f"request must be a ForgetRequest, got {type(request).__name__}")
        check_round_cap(rounds)  # min_clients: the Federation checks it, against the clients that connect
        if round_timeout is not None and not (isinstance(round_timeout, (int, float)) and round_timeout > 0):
            raise ValueError(f"round_timeout must be a number of seconds > 0 or None, got {round_timeout!r}")
        self.request, self.rounds, self.evaluate = request, rounds, evaluate
        self.min_clients, self.round_timeout = min_clients, round_timeout
        asked = UnlearnConfig.build(config, **overrides)
        self.config = asked.resolved(request, "federated")
        self.calibrate_auto = asked.calibrate == "auto"  # "auto" leaves out a calibration the mask cannot take

    def key(self) -> str:
        """What a server checkpoint must match to be resumed: request, settings, rounds."""
        return cache_key({"request": self.request.to_dict(), "config": self.config.to_dict(), "rounds": self.rounds})

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

    def save(self, out_dir: str | os.PathLike) -> Path:
        """``model.pt`` (final arrays), ``trained.pt`` and, after unlearning, ``mask.pt`` and ``report.json`` (the
        :class:`UnlearningReport` the in-process engines write; metrics are the clients' own), each atomic."""
        out = Path(out_dir)
        save_torch(self.arrays, out / "model.pt")
        save_torch(self.trained, out / "trained.pt")
        if self.plan is None:
            return out
        self.mask.save(out / "mask.pt")
        plan, unlearned = self.plan, self.evaluation[-1] if self.evaluation else {}
        report = UnlearningReport(
            request=plan.request.to_dict(), method=plan.config.method,
            params={**plan.config.to_dict(), "engine": "flower", "rounds": plan.rounds}, seed=plan.config.seed,
            original_sha256=weights_sha256(self.trained), unlearned_sha256=weights_sha256(self.arrays),
            metrics={"unlearned": {k: v for k, v in unlearned.items() if k != "round"}},
            timings_s=dict(self.timings_s), mask=UnlearningReport.mask_summary(self.mask),
            bytes_moved=self.traffic.as_dict(),
            extra={"clients": self.clients, "training": self.training, "unlearning": self.unlearning,
                   "evaluation": self.evaluation, "dropped": self.dropped, "resumed": self.resumed},
        )
        write_json(report.to_dict(), out / "report.json")
        return out


def run_server(
    grid: Grid, model: pl.LightningModule, num_clients: int, train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None, timeout: float = 3600, checkpoint: str | os.PathLike | None = None,
) -> FlowerRunResult:
    """FedAvg from ``model``'s arrays (skipped when ``train`` is None), deploy, then unlearn (when asked).
    ``checkpoint``: a folder; a restarted run with the same plans resumes from it (FedAvg's finished rounds are not
    run again, unlearning keeps its mask)."""
    key = {"train": cache_key(vars(train)) if train else "none", "unlearn": unlearn.key() if unlearn else "none",
           "clients": str(num_clients)}
    saver = ServerCheckpoint.open(checkpoint, key) if checkpoint is not None else ServerCheckpoint()
    laps = [time.perf_counter()]  # connect, training, deploy, unlearning
    fed = Federation(grid, num_clients, timeout, unlearn.min_clients if unlearn else None,
                     unlearn.round_timeout if unlearn else None)
    result = FlowerRunResult(clients=dict(fed.nodes), traffic=fed.traffic, plan=unlearn, dropped=fed.dropped)
    laps.append(time.perf_counter())
    if saver.trained is not None:  # a restart
        set_arrays(model, saver.trained)
        result.resumed = {"fedavg_rounds": len(saver.training), "mask": saver.mask is not None,
                          "rounds_done": saver.rounds_done}
        log.info("resuming from checkpoint %s: %s", checkpoint, result.resumed)
    if train is not None:
        result.training = run_fedavg(model, fed, **vars(train), deploy=False, checkpoint=saver).history
    laps.append(time.perf_counter())
    result.trained = get_arrays(model)
    if saver.trained is None:  # no FedAvg: the model to resume unlearning from
        saver.update(trained=result.trained)
    deploy_model(fed, result.trained)
    laps.append(time.perf_counter())
    if unlearn is not None:
        out = run_unlearning(fed, model, unlearn.request, unlearn.config, unlearn.rounds, auto=unlearn.calibrate_auto,
                             trained_epochs=train.rounds * train.local_epochs if train is not None else None,
                             evaluate=unlearn.evaluate, checkpoint=saver)
        result.scores, result.mask, result.unlearning = out.scores, out.mask, out.history
        result.evaluation, result.calibration = out.extra.get("evaluation", []), out.extra.get("calibration", [])
    laps.append(time.perf_counter())
    result.arrays = get_arrays(model)
    phases = ("connect", "training", "deploy", "unlearning")
    result.timings_s = {**{name: b - a for name, a, b in zip(phases, laps, laps[1:])}, "total": laps[-1] - laps[0]}
    return result


def make_server_app(
    model_fn: Callable[[], pl.LightningModule], num_clients: int, train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None, sink: FlowerRunResult | None = None, out_dir: str | os.PathLike | None = None,
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
            result.save(out_dir)

    return app

