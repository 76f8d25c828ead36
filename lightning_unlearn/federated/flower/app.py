"""Ready-made apps for ``flwr run``: SmallCNN, FedAvg, then forget one class; settings from ``run_config``.

The keys are those of ``examples/flower_app/pyproject.toml``. A node reads its shard from
``node_config["data-path"]`` when set (a deployment), else rebuilds the simulated federation's ``partition-id``.
"""
from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.partitions import DATA_PATH_KEY, ClientPartition, FederatedPartitions, file_partition
from lightning_unlearn.federated.flower.server_app import FedAvgPlan, UnlearnPlan, run_server, save_result
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest

REQUIRED = ("num-clients", "train-rounds", "local-steps", "forget-class", "unlearn-rounds", "unlearn-steps", "output-dir")


def _get(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key not in config and default is None:
        raise KeyError(f"run config has no {key!r} (it has {sorted(config)}); set it under [tool.flwr.app.config]")
    return config.get(key, default)


def model_from_config(context: Context) -> SmallCNN:
    """SmallCNN for 1-channel images; seeded, so the server's initial model is reproducible."""
    torch.manual_seed(int(_get(context.run_config, "seed", 0)))
    return SmallCNN(lr=float(_get(context.run_config, "lr", 3e-3)))


def partition_from_config(context: Context) -> ClientPartition:
    if DATA_PATH_KEY in context.node_config:
        return file_partition(context)
    c = context.run_config
    parts = FederatedPartitions(
        dataset=str(_get(c, "dataset", "digits")), num_clients=int(_get(c, "num-clients")),
        partition=str(_get(c, "partition", "iid")), alpha=float(_get(c, "alpha", 0.5)), seed=int(_get(c, "seed", 0)),
        batch_size=int(_get(c, "batch-size", 32)), data_root=str(_get(c, "data-root", "")) or None,
    )
    return parts(context)


clientapp = make_client_app(model_from_config, partition_from_config)
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg, deploy, forget ``forget-class``, then save ``model.pt``/``trained.pt``/``report.json``."""
    c = context.run_config
    missing = [k for k in REQUIRED if k not in c]
    if missing:
        raise KeyError(f"run config lacks {missing}; set them under [tool.flwr.app.config]")
    seed = int(_get(c, "seed", 0))
    train = FedAvgPlan(rounds=int(c["train-rounds"]), seed=seed, local_config={"max_steps": int(c["local-steps"])})
    min_clients, round_timeout = int(_get(c, "min-clients", 0)), float(_get(c, "round-timeout", 0.0))
    reset = str(_get(c, "reset", ""))
    unlearn = UnlearnPlan(ForgetRequest(classes=[int(c["forget-class"])]), method=str(_get(c, "method", "grad_x_act")),
                          ratio=float(_get(c, "ratio", 0.1)), rounds=int(c["unlearn-rounds"]),
                          max_steps=int(c["unlearn-steps"]), seed=seed, min_clients=min_clients or None,
                          round_timeout=round_timeout or None, **({"reset": reset} if reset else {}))
    checkpoint = str(_get(c, "checkpoint-dir", "")) or None
    result = run_server(grid, model_from_config(context), int(c["num-clients"]), train, unlearn, checkpoint=checkpoint)
    out = save_result(result, Path(str(c["output-dir"])) / f"run-{context.run_id}")
    log(INFO, "lightning-unlearn: results in %s; mask fraction %.3f; federated forget acc %s", out,
        result.mask.fraction, result.evaluation[-1].get("forget_acc") if result.evaluation else "n/a")
