"""The simulation harness: a federation in one process, trained, handed a request, evaluated, reported.

The clients are the protocol's ClientApp on a :class:`~lightning_unlearn.federated.grid.LocalGrid`
(:func:`make_clients`): the server phases talk to them exactly as to a Flower deployment. Evaluation here is an
oracle: it reads the forget and retain data to measure the result. It lives outside the server on purpose; the
server code never sees it.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_unlearn._io import to_jsonable
from lightning_unlearn.scoring import discover_layers
from lightning_unlearn.scoring.layers import LayerInfo
from torch.utils.data import Dataset

from lightning_unlearn.data.federated import ClientSplit, FederatedDataModule, FederatedForgetPlan
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.partitions import ClientPartition
from lightning_unlearn.federated.fedavg import FedAvgResult, run_fedavg
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.protocol import FederatedUnlearningResult
from lightning_unlearn.federated.server import check_rounds
from lightning_unlearn.metrics import accuracy, split_accuracies
from lightning_unlearn.request import ForgetRequest

METRIC_KEYS = ("forget_acc", "remaining_acc", "test_acc")


@dataclass
class LocalClient:
    """One in-process node's own set-up, which its ClientApp reads: its shard, its Lightning callbacks (e.g. its
    DP-SGD accountant) and the working model. ``split`` is the oracle's view of the current request."""

    client_id: int
    dataset: Dataset
    sample_ids: np.ndarray
    model: pl.LightningModule
    callbacks: list[Callback] = field(default_factory=list)
    split: ClientSplit | None = None


class LocalClients(list):
    """The in-process clients, and the :class:`LocalGrid` whose ClientApp serves them (``grid``)."""

    grid: LocalGrid


def make_clients(
    fdm: FederatedDataModule,
    model: pl.LightningModule,
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> LocalClients:
    """One :class:`LocalClient` per shard behind one ClientApp (they share one working copy of ``model``:
    local grids run one client at a time)."""
    fdm.setup("fit")
    work = copy.deepcopy(model)
    clients = LocalClients(LocalClient(k, fdm.client_dataset(k), np.asarray(fdm.client_indices(k)), work)
                           for k in range(fdm.num_clients))

    def partition(context) -> ClientPartition:
        c = clients[int(context.node_config["partition-id"])]
        return ClientPartition(c.client_id, c.dataset, c.sample_ids, fdm.num_classes, fdm.batch_size, c.callbacks)

    app = make_client_app(lambda: work, partition, (lambda: list(callbacks)) if callbacks else None, trainer_kwargs)
    clients.grid = LocalGrid(app, len(clients))
    return clients


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class FederatedSimulation:
    """A federation of ``fdm.num_clients`` clients training ``model`` with FedAvg, ready to unlearn.

    Args:
        rounds, local_epochs, fraction: the FedAvg schedule (the retraining reference reuses it).
        callbacks, trainer_kwargs: the user's Lightning callbacks / Trainer options for every local run.
        checkpoint_dir: per-round server checkpoints (``resume=True`` continues a run).
        store_every: keep client updates every n rounds, for FedEraser.
    """

    def __init__(
        self,
        fdm: FederatedDataModule,
        model: pl.LightningModule,
        rounds: int = 5,
        local_epochs: int = 1,
        fraction: float = 1.0,
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        store_every: int | None = None,
        progress: bool = True,
    ) -> None:
        check_rounds(rounds)
        check_rounds(local_epochs, "local_epochs")
        fdm.setup("fit")
        self.fdm, self.model, self.rounds, self.local_epochs = fdm, model, rounds, local_epochs
        self.fraction, self.seed, self.progress = fraction, seed, progress
        self.checkpoint_dir, self.store_every = checkpoint_dir, store_every
        self.clients = make_clients(fdm, model, callbacks, trainer_kwargs)
        self._trainer_kwargs = dict(trainer_kwargs or {})
        self.training: FedAvgResult | None = None
        self.plan: FederatedForgetPlan | None = None
        self._eval_dm: UnlearningDataModule | None = None
        self.timings_s: dict[str, float] = {}

    # -- phases ---------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> FedAvgResult:
        """Original federated training; the final model is deployed to every client."""
        start = time.perf_counter()
        self.training = run_fedavg(
            self.model, self.clients, self.rounds, self.fraction, self.local_epochs, self.seed,
            evaluate=self.test_accuracy, checkpoint_dir=self.checkpoint_dir, resume=resume,
            store_every=self.store_every, run_key=self.run_key(), progress=self.progress,
        )
        self.timings_s["training"] = time.perf_counter() - start
        return self.training

    def run_key(self) -> dict[str, str]:
        """Short hashes of what makes this federation's training what it is (rounds excluded: a run may extend).

        A resume file written by another data split, partition, model or schedule is refused with them.
        """
        fdm = self.fdm
        parts = [np.asarray(fdm.client_indices(k), dtype=np.int64) for k in range(fdm.num_clients)]
        state = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        parts_bytes = b"".join(np.asarray([len(p)], dtype=np.int64).tobytes() + p.tobytes() for p in parts)
        return {
            "data": _digest(np.asarray(fdm.targets, dtype=np.int64).tobytes()),
            "partition": _digest(repr((fdm.partition, fdm.alpha, fdm.seed, fdm.num_clients)).encode() + parts_bytes),
            "model": _digest(repr((type(self.model).__qualname__, sorted(state.items()))).encode()),
            "hyper_parameters": _digest(repr(sorted(dict(getattr(self.model, "hparams", {})).items())).encode()),
            "schedule": _digest(repr((self.local_epochs, self.fraction, self.seed, sorted(self._trainer_kwargs.items())))
                                .encode()),
        }

    def request(self, request: ForgetRequest) -> FederatedForgetPlan:
        """Resolve and hand the request to the clients (each learns only its own split)."""
        self.plan = self.fdm.forget_plan(request)
        for client, split in zip(self.clients, self.plan.splits):
            client.split = split
        self._eval_dm = UnlearningDataModule(
            self.fdm.train_dataset, self.fdm.test_dataset, request, batch_size=512, seed=self.seed,
            num_classes=self.fdm.num_classes, forget_indices=self.plan.forget_indices,
        )
        return self.plan

    @property
    def evaluation_datamodule(self) -> UnlearningDataModule:
        """The oracle's central view of the current request (forget / retain / test splits) for evaluation."""
        if self._eval_dm is None:
            raise RuntimeError("call request(...) first")
        return self._eval_dm

    def layers(self) -> dict[str, LayerInfo]:
        """Layer metadata from the model's structure (a zero input of the data's shape)."""
        x = self.fdm.test_dataset[0][0]
        return discover_layers(self.model, torch.zeros(2, *x.shape, dtype=x.dtype))

    # -- evaluation (oracle) ----------------------------------------------------------------------
    def test_accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        return {"test_acc": accuracy(model, self.fdm.test_dataloader(), self.fdm.num_classes)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float | None]:
        """forget / remaining / test accuracy for the current request (see :func:`split_accuracies`)."""
        if self._eval_dm is None:
            raise RuntimeError("call request(...) before evaluate(...)")
        return split_accuracies(model, self._eval_dm)

    # -- report -----------------------------------------------------------------------------------
    def report(
        self,
        result: FederatedUnlearningResult,
        original: Mapping[str, Any],
        retrained: FederatedUnlearningResult,
        retrained_metrics: Mapping[str, Any],
        unlearned_metrics: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The run's JSON-ready record (the issue's contract plus context)."""
        unlearned = unlearned_metrics if unlearned_metrics is not None else self.evaluate(result.model)
        fedavg_round = self.training.bytes_per_round if self.training is not None else math.nan
        retrain_s = retrained.timings_s["retrain"]
        wall = result.timings_s.get("total", math.nan)
        pick = lambda m: {k: m.get(k) for k in (*METRIC_KEYS, "forget_train_acc", "retain_train_acc")}  # noqa: E731
        return {
            "request": self.plan.request.to_dict(),
            "method": result.method,
            "seed": self.seed,
            "partition": {"kind": self.fdm.partition, "alpha": self.fdm.alpha, "num_clients": self.fdm.num_clients,
                          "clients_forgetting": self.plan.forgetting_clients, "clients_dropped": self.plan.dropped},
            "schedule": {"rounds": self.rounds, "local_epochs": self.local_epochs, "fraction": self.fraction},
            "mask": {"fraction": None if result.mask is None else result.mask.fraction,
                     "channels": None if result.mask is None else result.mask.channels,
                     "sha256": None if result.mask is None else result.mask.sha256()},
            "metrics": {"original": pick(original), "unlearned": pick(unlearned), "retrained": pick(retrained_metrics)},
            "timings_s": {"training": self.training.wall_s if self.training is not None else None, "scoring": result.timings_s.get("scoring", 0.0),
                          "unlearning": result.timings_s.get("unlearning"), "retrain": retrain_s, "total": wall,
                          **({"reset": result.timings_s["reset"]} if "reset" in result.timings_s else {})},
            "speedup_vs_retrain": retrain_s / wall if wall else None,
            "bytes": {**result.bytes, "fedavg_round": fedavg_round,
                      "ratio_to_fedavg_round": result.bytes["unlearning_round"] / fedavg_round},
            "config": None if result.config is None else result.config.to_dict(),
            "extra": to_jsonable(result.extra),
        }
