"""FedAvg on any grid: Flower's own ``FedAvg`` strategy, with the library's client sampling and exact aggregation."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor, nn

from lightning_unlearn.federated.checkpoint import ServerCheckpoint
from lightning_unlearn.federated.federation import Federation, as_federation, check_replies
from lightning_unlearn.federated.messages import down, tensor_bytes, with_config
from lightning_unlearn.federated.server import check_fraction, check_rounds, fedavg_aggregate, sample_clients
from lightning_unlearn.mask.arrays import get_arrays, set_arrays

DATA_CHOICES = ("all", "retain")


@dataclass
class UpdateStore:
    """FedEraser's memory: every ``every``-th round, the global model and each client's update."""

    every: int
    rounds: list[dict] = field(default_factory=list)  # {"round", "global", "updates": {cid: arrays}}

    @property
    def nbytes(self) -> int:
        return int(sum(tensor_bytes(r["global"]) + sum(map(tensor_bytes, r["updates"].values())) for r in self.rounds))


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
        return sum(r["overhead_s"] for r in self.history) / local if local else math.nan

    @property
    def wall_s(self) -> float:
        return float(sum(r["round_s"] for r in self.history))

    @property
    def bytes_per_round(self) -> float:
        return float(np.mean([r["bytes_down"] + r["bytes_up"] for r in self.history])) if self.history else math.nan


def check_fedavg(rounds: int, local_epochs: int, fraction: float, data: str) -> None:
    """A FedAvg schedule (``run_fedavg``, ``FedAvgPlan``, ``FederatedSimulation``), checked before any work."""
    check_rounds(rounds)
    check_rounds(local_epochs, "local_epochs")
    check_fraction(fraction)
    if data not in DATA_CHOICES:
        raise ValueError(f"unknown data {data!r}; allowed values are {list(DATA_CHOICES)}")


class LibraryFedAvg(FedAvg):
    """Flower's FedAvg with the library's client sampling, per-client seeds and exact (float64) aggregation; the
    ``checkpoint`` is rewritten after every round."""

    def __init__(self, fed: Federation, model: nn.Module, pool: Sequence[int], fraction: float, seed: int,
                 settings: Mapping[str, Any], label: str, history: list[dict], store: UpdateStore | None,
                 evaluate: Callable[[nn.Module], Mapping[str, float]] | None, checkpoint: ServerCheckpoint) -> None:
        super().__init__(fraction_train=fraction, min_train_nodes=1, min_available_nodes=len(fed))
        self.fed, self.model, self.pool, self.seed, self.settings, self.label = fed, model, pool, seed, settings, label
        self.history, self.store, self.evaluate, self.checkpoint = history, store, evaluate, checkpoint
        self._t0, self._picked, self._expected = 0.0, 0, {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = len(self.history)  # one row per finished round, a resumed run's saved rows included
        self._t0 = time.perf_counter()
        self._expected = dict(arrays.to_torch_state_dict())  # what every reply must match
        picked = [int(c) for c in sample_clients(self.pool, self.fraction_train, self.seed, r)]
        self._picked = len(picked)
        packed = down(self._expected)  # the arrays packed once; each client its own seed per round
        return [self.fed.message(cid, with_config(packed, {"seed": self.seed * 100_003 + r * 1_000 + cid,
                                                           **self.settings}), "train", f"{self.label}/{r}")
                for cid in picked]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = len(self.history)
        label = f"{self.label}/{r}"
        replies = self.fed.decode(check_replies(list(replies), self._picked, f"FedAvg round {r}"), label)
        if not replies:
            raise ValueError(f"round {r}: no sampled client had data to train on")
        t_agg = time.perf_counter()
        new = fedavg_aggregate(replies, self._expected)
        if self.store is not None and r % self.store.every == 0:
            self.store.rounds.append({
                "round": r, "global": self._expected,
                "updates": {m.client: {k: m.tensors[k] - self._expected[k] for k in self._expected} for m in replies}})
        agg_s, t_eval = time.perf_counter() - t_agg, time.perf_counter()
        row = self.fed.row(r, self._t0, replies, label)
        row.update(clients=[m.client for m in replies], aggregate_s=agg_s)
        if self.evaluate is not None:
            set_arrays(self.model, new)
            row.update({k: float(v) for k, v in self.evaluate(self.model).items()})
        row["eval_s"] = time.perf_counter() - t_eval
        row["round_s"] = time.perf_counter() - self._t0
        row["overhead_s"] = row["round_s"] - row["eval_s"] - row["local_compute_s"]
        t_ck = time.perf_counter()
        self.checkpoint.update(trained=new, training=self.history + [row],
                               store=self.store.rounds if self.store else None)
        row["checkpoint_s"] = time.perf_counter() - t_ck  # in memory only; the saved row stops before saving
        row["round_s"] += row["checkpoint_s"]
        row["overhead_s"] += row["checkpoint_s"]
        self.history.append(row)
        return ArrayRecord(new), MetricRecord({"local_compute_s": row["local_compute_s"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the global model is evaluated on the server (``evaluate``), never on client data


def run_fedavg(
    model: nn.Module, clients: Any, rounds: int, fraction: float = 1.0, local_epochs: int = 1, seed: int = 0,
    data: str = "all", evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    checkpoint: ServerCheckpoint | None = None, store_every: int | None = None, deploy: bool = True,
    local_config: Mapping[str, Any] | None = None, label: str = "fedavg", participants: Sequence[int] | None = None,
    progress: bool = True,
) -> FedAvgResult:
    """Federated averaging: ``rounds`` rounds of local Lightning training on a sampled ``fraction`` of clients;
    ``model`` ends with the global arrays. ``clients``: a ``Federation`` (any grid) or a simulation's ``clients``.

    ``data``: each client trains on ``"all"`` its shard or ``"retain"`` (minus the federation's request).
    ``evaluate``: server-side evaluation of the global model after each round. ``checkpoint``: rewritten after every
    round; the rounds it holds are not trained again. ``store_every``: keep every n-th round's client updates
    (FedEraser). ``deploy``: every client keeps the final model. ``participants``: who may be sampled (default: all).
    ``progress``: Flower's per-round log lines (False: warnings only).
    """
    check_fedavg(rounds, local_epochs, fraction, data)
    ck = checkpoint or ServerCheckpoint()
    store = UpdateStore(store_every, ck.store or []) if store_every else None
    if ck.trained is not None:
        set_arrays(model, ck.trained)
    fed = as_federation(clients)
    fed.start_run()
    pool = sorted(participants) if participants is not None else sorted(fed.nodes)
    if not pool:
        raise ValueError("no client may take part in FedAvg (participants is empty)")
    settings = {"epochs": local_epochs, "data": data, **(local_config or {})}
    strategy = LibraryFedAvg(fed, model, pool, fraction, seed, settings, label, list(ck.training), store, evaluate, ck)
    arrays, first = get_arrays(model), len(ck.training)
    if first < rounds:
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(level if progress else logging.WARNING)
        try:
            arrays = dict(strategy.start(fed.grid, ArrayRecord(arrays), num_rounds=rounds - first,
                                         timeout=fed.timeout).arrays.to_torch_state_dict())
        finally:
            flwr_log.setLevel(level)
    set_arrays(model, arrays)
    if deploy:
        deploy_model(fed, arrays)
    return FedAvgResult(model, strategy.history, store)


def deploy_model(fed: Federation, arrays: Mapping[str, Tensor]) -> None:
    """Every client keeps the global model: the reference its masked rounds start from."""
    content = down(arrays)
    fed.ask({cid: content for cid in sorted(fed.nodes)}, "query.deploy", "deploy")
