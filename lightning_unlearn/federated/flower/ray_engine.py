"""One call to run the protocol on Flower's simulation engine (Ray), results back in-process."""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
from flwr.app import Context
from lightning.pytorch.callbacks import Callback

from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.flower.server_app import FedAvgPlan, FlowerRunResult, UnlearnPlan, make_server_app
from lightning_unlearn.federated.partitions import ClientPartition
from lightning_unlearn.federated.server import check_rounds
from lightning_unlearn.mask.arrays import set_arrays


def run_flower_simulation(
    model_fn: Callable[[], pl.LightningModule], partitions: Callable[[Context], ClientPartition], num_clients: int,
    train: FedAvgPlan | None = None, unlearn: UnlearnPlan | None = None,
    initial_model: pl.LightningModule | None = None, trainer_kwargs: Mapping[str, Any] | None = None,
    callbacks_fn: Callable[[], Sequence[Callback]] | None = None, client_cpus: float = 1.0,
    total_cpus: int | None = None, out_dir: str | os.PathLike | None = None, timeout: float = 3600,
    verbose: bool = False,
) -> FlowerRunResult:
    """Train (``train``) and/or unlearn (``unlearn``) with ``num_clients`` simulated Flower nodes."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError('Flower simulation needs Ray (flwr[simulation]), which is not installed: '
                          'pip install "lightning-unlearn[flower]"')
    check_rounds(num_clients, "num_clients")
    if not client_cpus > 0:
        raise ValueError(f"client_cpus must be > 0, got {client_cpus!r}")
    from flwr.simulation import run_simulation

    def server_model() -> pl.LightningModule:
        model = model_fn()
        if initial_model is not None:
            set_arrays(model, {k: v for k, v in initial_model.state_dict().items() if v.is_floating_point()})
        return model

    sink = FlowerRunResult()
    server = make_server_app(server_model, num_clients, train, unlearn, sink, out_dir, timeout)
    client = make_client_app(model_fn, partitions, callbacks_fn, trainer_kwargs)
    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose}
    if total_cpus is not None:
        init_args["num_cpus"] = int(total_cpus)
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    flwr_logger = logging.getLogger("flwr")
    before = flwr_logger.level
    flwr_logger.setLevel(before if verbose else logging.WARNING)
    try:
        run_simulation(server, client, num_supernodes=num_clients, backend_config=backend, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(before)
    if not sink.clients:
        raise RuntimeError("the Flower simulation ended without a result (see the log above for the ServerApp error)")
    return sink
