"""Ready-made apps for ``flwr run``: SmallCNN, FedAvg, then forget one class; settings from ``run_config`` (the
keys of ``examples/flower_app/pyproject.toml``). A node reads its shard from ``node_config["data-path"]`` when set
(a deployment), else rebuilds the simulated federation's ``partition-id``."""
from __future__ import annotations

from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.partitions import DATA_PATH_KEY, ClientPartition, FederatedPartitions, file_partition
from lightning_unlearn.federated.flower.server_app import FedAvgPlan, UnlearnPlan, run_server
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest

REQUIRED = ("num-clients", "train-rounds", "local-steps", "forget-class", "unlearn-rounds", "unlearn-steps",
            "output-dir")


def model_from_config(context: Context) -> SmallCNN:
    """SmallCNN for 1-channel images; seeded, so the server's initial model is reproducible."""
    torch.manual_seed(int(context.run_config.get("seed", 0)))
    return SmallCNN(lr=float(context.run_config.get("lr", 3e-3)))


def partition_from_config(context: Context) -> ClientPartition:
    if DATA_PATH_KEY in context.node_config:
        return file_partition(context)
    c = context.run_config  # the server's main checked REQUIRED before any message reached a node
    return FederatedPartitions(str(c.get("dataset", "digits")), int(c["num-clients"]), str(c.get("partition", "iid")),
                               float(c.get("alpha", 0.5)), int(c.get("seed", 0)), int(c.get("batch-size", 32)),
                               str(c.get("data-root", "")) or None)(context)


clientapp = make_client_app(model_from_config, partition_from_config)
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg, deploy, forget ``forget-class``, then save ``model.pt``/``trained.pt``/``report.json``."""
    c = context.run_config
    if missing := [k for k in REQUIRED if k not in c]:
        raise KeyError(f"run config lacks {missing}; set them under [tool.flwr.app.config]")
    seed, reset = int(c.get("seed", 0)), str(c.get("reset", ""))
    train = FedAvgPlan(rounds=int(c["train-rounds"]), seed=seed, local_config={"max_steps": int(c["local-steps"])})
    unlearn = UnlearnPlan(ForgetRequest(classes=[int(c["forget-class"])]), method=str(c.get("method", "grad_x_act")),
                          ratio=float(c.get("ratio", 0.1)),
                          rounds="auto" if c["unlearn-rounds"] == "auto" else int(c["unlearn-rounds"]),
                          max_steps=int(c["unlearn-steps"]), seed=seed,
                          min_clients=int(c.get("min-clients", 0)) or None,
                          round_timeout=float(c.get("round-timeout", 0.0)) or None,
                          **({"reset": reset} if reset else {}))
    checkpoint = str(c.get("checkpoint-dir", "")) or None
    result = run_server(grid, model_from_config(context), int(c["num-clients"]), train, unlearn, checkpoint=checkpoint)
    out = result.save(Path(str(c["output-dir"])) / f"run-{context.run_id}")
    log(INFO, "lightning-unlearn: results in %s; mask fraction %.3f; federated forget acc %s", out,
        result.mask.fraction, result.evaluation[-1].get("forget_acc") if result.evaluation else "n/a")
