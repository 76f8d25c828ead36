"""Where a node finds its data: a recipe that rebuilds a simulated federation, or a shard file on the node's disk."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from flwr.app import Context
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset, TensorDataset

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.data.datasets import dataset_targets, load_digits_datasets, load_mnist
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.data.validation import checked_targets

DATASETS = ("digits", "mnist")
PARTITION_KEY, DATA_PATH_KEY = "partition-id", "data-path"


@dataclass
class ClientPartition:
    """One node's data: its client id, its shard, and the shard's ids in the global training set."""

    client_id: int
    dataset: Dataset
    sample_ids: np.ndarray | None = None
    num_classes: int = 10
    batch_size: int = 64
    callbacks: Sequence[Callback] = ()

    @functools.cached_property
    def targets(self) -> np.ndarray:
        """The shard's labels, read once: every message that names a request resolves the node's split from them."""
        return dataset_targets(self.dataset).numpy()


class FlowerDataError(RuntimeError):
    """A client node cannot reach its data partition (missing key, bad id, missing file)."""


@dataclass(frozen=True)
class FederatedPartitions:
    """Recipe for the simulated federation; ``__call__(context)`` gives the node its shard (only the recipe is
    pickled to the workers; each builds the data module once)."""

    dataset: str = "digits"
    num_clients: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    batch_size: int = 64
    data_root: str | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed datasets are {list(DATASETS)}")
        if self.dataset == "mnist" and not self.data_root:
            raise ValueError("dataset='mnist' needs data_root (the folder with the MNIST idx .gz files)")

    @functools.lru_cache(maxsize=4)  # keyed on the (frozen) recipe: each worker builds its data module once
    def datamodule(self) -> FederatedDataModule:
        if self.dataset == "digits":
            train, test = load_digits_datasets(seed=self.seed)
        else:
            try:
                train, test = load_mnist(self.data_root)
            except OSError as err:  # FileNotFoundError included
                raise FlowerDataError(f"this node cannot read MNIST from data_root={self.data_root!r}: {err}") from err
        return FederatedDataModule(train, test, num_clients=self.num_clients, partition=self.partition,
                                   alpha=self.alpha, seed=self.seed, batch_size=self.batch_size)

    def __call__(self, context: Context) -> ClientPartition:
        last = self.num_clients - 1
        k = _node_config(context, PARTITION_KEY, f"<0..{last}>")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= last:
            raise FlowerDataError(f"{PARTITION_KEY}={k!r} names no data partition; allowed ids are 0..{last}")
        fdm = self.datamodule()
        return ClientPartition(k, fdm.client_dataset(k), fdm.client_indices(k), fdm.num_classes, fdm.batch_size)


def save_partition(fdm: FederatedDataModule, client_id: int, path: str | os.PathLike) -> Path:
    """Write client ``client_id``'s shard (inputs, labels, global ids) for a real node's disk."""
    ds = fdm.client_dataset(client_id)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    blob = {"x": xs, "y": dataset_targets(ds), "sample_ids": torch.as_tensor(fdm.client_indices(client_id)),
            "client_id": int(client_id), "num_classes": int(fdm.num_classes), "batch_size": int(fdm.batch_size)}
    return save_torch(blob, path)


def _node_config(context: Context, key: str, example: str) -> Any:
    if key not in context.node_config:
        raise FlowerDataError(f"this node has no {key!r} in its node config (it has {sorted(context.node_config)}), "
                              f"so it cannot find its data partition; start it with --node-config \"{key}={example}\"")
    return context.node_config[key]


def file_partition(context: Context) -> ClientPartition:
    """Deployment: the shard at ``node_config["data-path"]`` (written by :func:`save_partition`)."""
    path = Path(str(_node_config(context, DATA_PATH_KEY, "'/path/to/client.pt'")))
    where = f"{DATA_PATH_KEY}={str(path)!r}"
    if not path.is_file():
        raise FlowerDataError(f"{where} does not exist on this node: it cannot reach its data")
    blob = load_torch_file(path, DATA_PATH_KEY)
    if missing := [k for k in ("x", "y", "sample_ids", "client_id", "num_classes", "batch_size") if k not in blob]:
        raise FlowerDataError(f"{where} is not a partition file: it lacks {missing}")
    dataset = TensorDataset(blob["x"], blob["y"])
    try:  # the node's data, checked once before it takes part: finite inputs, labels in range
        checked_targets(dataset, where, int(blob["num_classes"]))
    except ValueError as err:
        raise FlowerDataError(str(err)) from None
    return ClientPartition(int(blob["client_id"]), dataset, blob["sample_ids"].numpy(),
                           int(blob["num_classes"]), int(blob["batch_size"]))
