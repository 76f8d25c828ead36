"""A federation in one process: the protocol's ClientApp on a :class:`~lightning_unlearn.federated.grid.LocalGrid`.
Its evaluation is an oracle that reads the forget and retain data: it lives here, the server code never sees it."""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_unlearn._io import to_jsonable
from lightning_unlearn.data.federated import FederatedDataModule, FederatedForgetPlan
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence.references import cache_key, index_hash, model_description
from lightning_unlearn.federated.checkpoint import ServerCheckpoint
from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.fedavg import FedAvgResult, check_fedavg, run_fedavg
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.partitions import ClientPartition
from lightning_unlearn.federated.protocol import FederatedUnlearningResult
from lightning_unlearn.metrics import accuracy, split_accuracies
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.scoring.layers import LayerInfo, discover_layers


@dataclass
class LocalClient(ClientPartition):
    """An in-process node: the partition its ClientApp reads (``callbacks``: e.g. its DP-SGD accountant) and the
    shared working ``model``."""

    model: pl.LightningModule | None = None


class LocalClients(list):
    """The in-process clients, and the :class:`LocalGrid` whose ClientApp serves them (``grid``)."""

    grid: LocalGrid


def make_clients(fdm: FederatedDataModule, model: pl.LightningModule, callbacks: Sequence[Callback] = (),
                 trainer_kwargs: Mapping[str, Any] | None = None) -> LocalClients:
    """One :class:`LocalClient` per shard behind one ClientApp, sharing one working copy of ``model`` (a local grid
    runs one client at a time)."""
    work = copy.deepcopy(model)
    clients = LocalClients(LocalClient(k, fdm.client_dataset(k), fdm.client_indices(k), fdm.num_classes,
                                       fdm.batch_size, [], work) for k in range(fdm.num_clients))
    app = make_client_app(lambda: work, lambda context: clients[int(context.node_config["partition-id"])],
                          (lambda: list(callbacks)) if callbacks else None, trainer_kwargs)
    clients.grid = LocalGrid(app, len(clients))
    return clients


class FederatedSimulation:
    """``fdm.num_clients`` clients training ``model`` with FedAvg (``rounds``, ``local_epochs``, ``fraction``: also the
    retrained reference's schedule), ready to unlearn. ``callbacks`` and ``trainer_kwargs`` go to every local run;
    ``checkpoint_dir``: per-round resume files for ``train(resume=True)``; ``store_every``: updates for FedEraser."""

    def __init__(self, fdm: FederatedDataModule, model: pl.LightningModule, rounds: int = 5, local_epochs: int = 1,
                 fraction: float = 1.0, seed: int = 0, callbacks: Sequence[Callback] = (),
                 trainer_kwargs: Mapping[str, Any] | None = None, checkpoint_dir: str | os.PathLike | None = None,
                 store_every: int | None = None, progress: bool = True) -> None:
        check_fedavg(rounds, local_epochs, fraction, "all")
        self.fdm, self.model, self.rounds, self.local_epochs = fdm, model, rounds, local_epochs
        self.fraction, self.seed, self.progress = fraction, seed, progress
        self.checkpoint_dir, self.store_every = checkpoint_dir, store_every
        self.clients = make_clients(fdm, model, callbacks, trainer_kwargs)
        self._trainer_kwargs = dict(trainer_kwargs or {})
        self.training: FedAvgResult | None = None
        self.plan: FederatedForgetPlan | None = None
        self.evaluation_datamodule: UnlearningDataModule | None = None  # the oracle's central view of the request
        self.timings_s: dict[str, float] = {}

    def train(self, resume: bool = False) -> FedAvgResult:
        """Original federated training; the final model is deployed to every client."""
        start, folder = time.perf_counter(), self.checkpoint_dir
        self.training = run_fedavg(
            self.model, self.clients, self.rounds, self.fraction, self.local_epochs, self.seed,
            evaluate=lambda m: {"test_acc": accuracy(m, self.fdm.test_dataloader(), self.fdm.num_classes)},
            checkpoint=ServerCheckpoint.open(folder, self.run_key(), resume) if folder is not None else None,
            store_every=self.store_every, progress=self.progress,
        )
        self.timings_s["training"] = time.perf_counter() - start
        return self.training

    def run_key(self) -> dict[str, str]:
        """Hashes of data, partition, model and schedule (not the rounds: a run may extend): a resume file written
        by another run is refused."""
        fdm = self.fdm
        parts = [index_hash(fdm.client_indices(k)) for k in range(fdm.num_clients)]
        schedule = {"local_epochs": self.local_epochs, "fraction": self.fraction, "seed": self.seed,
                    "trainer": self._trainer_kwargs}
        return {"data": index_hash(fdm.targets), "model": cache_key(model_description(self.model)),
                "partition": cache_key({"recipe": [fdm.partition, fdm.alpha, fdm.seed], "parts": parts}),
                "schedule": cache_key(schedule)}

    def request(self, request: ForgetRequest) -> FederatedForgetPlan:
        """The oracle's view of ``request`` (the clients resolve their own splits from each message's request)."""
        self.plan = self.fdm.forget_plan(request)
        self.evaluation_datamodule = UnlearningDataModule(
            self.fdm.train_dataset, self.fdm.test_dataset, request, batch_size=512, seed=self.seed,
            num_classes=self.fdm.num_classes, forget_indices=self.plan.forget_indices,
        )
        return self.plan

    def layers(self) -> dict[str, LayerInfo]:
        """Layer metadata from the model's structure (a zero input of the data's shape)."""
        x = self.fdm.test_dataset[0][0]
        return discover_layers(self.model, torch.zeros(2, *x.shape, dtype=x.dtype))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float | None]:
        """forget / remaining / test accuracy for the current request (see :func:`split_accuracies`)."""
        if self.evaluation_datamodule is None:
            raise RuntimeError("call request(...) first")
        return split_accuracies(model, self.evaluation_datamodule)

    def report(self, result: FederatedUnlearningResult, original: Mapping[str, Any],
               retrained: FederatedUnlearningResult, retrained_metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The run's JSON-ready record (the issue's contract plus context)."""
        runs = {"original": original, "unlearned": self.evaluate(result.model), "retrained": retrained_metrics}
        keys = ("forget_acc", "remaining_acc", "test_acc", "forget_train_acc", "retain_train_acc")
        trained, mask, t = self.training, result.mask, result.timings_s
        fedavg_round = trained.bytes_per_round if trained is not None else math.nan
        retrain_s, wall = retrained.timings_s["retrain"], t.get("total", math.nan)
        fdm, plan = self.fdm, self.plan
        return {
            "request": plan.request.to_dict(), "method": result.method, "seed": self.seed,
            "partition": {"kind": fdm.partition, "alpha": fdm.alpha, "num_clients": fdm.num_clients,
                          "clients_forgetting": plan.forgetting_clients, "clients_dropped": plan.dropped},
            "schedule": {"rounds": self.rounds, "local_epochs": self.local_epochs, "fraction": self.fraction},
            "mask": dict.fromkeys(("fraction", "channels", "sha256")) if mask is None else
                    {"fraction": mask.fraction, "channels": mask.channels, "sha256": mask.sha256()},
            "metrics": {name: {k: run.get(k) for k in keys} for name, run in runs.items()},
            "timings_s": {"training": trained.wall_s if trained is not None else None, "scoring": t.get("scoring", 0.0),
                          "unlearning": t.get("unlearning"), "retrain": retrain_s, "total": wall,
                          **({"reset": t["reset"]} if "reset" in t else {})},
            "speedup_vs_retrain": retrain_s / wall if wall else None,
            "bytes": {**result.bytes, "fedavg_round": fedavg_round,
                      "ratio_to_fedavg_round": result.bytes["unlearning_round"] / fedavg_round},
            "config": None if result.config is None else result.config.to_dict(),
            "extra": to_jsonable(result.extra),
        }
