"""Flower's own simulation engine (Ray) running the library's apps, results back in this process, for the tests
(``benchmarks/flower_overhead.py`` and the docs make the same ``flwr.simulation.run_simulation`` call)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import lightning.pytorch as pl
from flwr.simulation import run_simulation

from lightning_unlearn.federated import make_client_app
from lightning_unlearn.federated.flower import FedAvgPlan, FlowerRunResult, UnlearnPlan, make_server_app
from lightning_unlearn.mask.arrays import get_arrays, set_arrays


def simulate(model_fn: Callable[[], pl.LightningModule], partitions: Callable, num_clients: int,
             train: FedAvgPlan | None = None, unlearn: UnlearnPlan | None = None,
             initial_model: pl.LightningModule | None = None, trainer_kwargs: Mapping[str, Any] | None = None,
             workers: int = 2, timeout: float = 3600) -> FlowerRunResult:
    """``num_clients`` simulated nodes (1 CPU each, ``workers`` CPUs for Ray); the server starts from
    ``initial_model``'s arrays when given."""
    def server_model() -> pl.LightningModule:
        model = model_fn()
        if initial_model is not None:
            set_arrays(model, get_arrays(initial_model))
        return model

    result = FlowerRunResult()
    run_simulation(make_server_app(server_model, num_clients, train, unlearn, sink=result, timeout=timeout),
                   make_client_app(model_fn, partitions, trainer_kwargs=trainer_kwargs), num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": workers, "logging_level": "ERROR",
                                                 "log_to_driver": False}})
    return result
