"""The Flower ``ClientApp``: each message is answered by a :class:`FederatedClient` handler.

A node finds its data through a partition function of its Flower ``Context``:

* simulation: :class:`FederatedPartitions` (a picklable recipe: dataset name + partition
  settings) rebuilds the same :class:`FederatedDataModule` in each worker process and takes
  shard ``node_config["partition-id"]``;
* deployment: :func:`file_partition` loads the shard written by :func:`save_partition` from
  ``node_config["data-path"]`` on the node's own disk.

What a client keeps between messages (the deployed model, the mask) lives in
``context.state``, which Flower persists per node, so any worker process can serve any node.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.data.datasets import dataset_targets, load_digits_datasets, load_mnist
from lightning_unlearn.data.federated import ClientSplit, FederatedDataModule
from lightning_unlearn.data.validation import checked_targets
from lightning_unlearn.mask.arrays import set_arrays
from lightning_unlearn.federated.client import FederatedClient
from lightning_unlearn.federated.flower.records import (
    COUNT_KEY,
    arrays_to_record,
    channels_to_record,
    content_to_broadcast,
    record_to_arrays,
    record_to_channels,
    reply_to_content,
)
from lightning_unlearn.federated.messages import Broadcast
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.request import ForgetRequest

DATASETS = ("digits", "mnist")
PARTITION_KEY, DATA_PATH_KEY = "partition-id", "data-path"


class FlowerDataError(RuntimeError):
    """A client node cannot reach its data partition (missing key, bad id, missing file)."""


@dataclass
class ClientPartition:
    """One node's data: its client id, its shard, and the shard's ids in the global training set.

    ``sample_ids`` lets the node resolve sample requests (which name global ids) by itself.
    """

    client_id: int
    dataset: Dataset
    sample_ids: np.ndarray | None = None
    num_classes: int = 10
    batch_size: int = 64


# -- finding the data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FederatedPartitions:
    """Recipe for the simulated federation; ``__call__(context)`` gives the node its shard.

    Only the recipe travels to the workers (cheap to pickle); each worker process builds the
    data module once. ``datamodule()`` builds the very same federation in-process (evaluation,
    comparisons).
    """

    dataset: str = "digits"
    num_clients: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    batch_size: int = 64
    data_root: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # more FederatedDataModule arguments

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed datasets are {list(DATASETS)}")
        if self.dataset == "mnist" and not self.data_root:
            raise ValueError("dataset='mnist' needs data_root (the folder with the MNIST idx .gz files)")

    def datamodule(self) -> FederatedDataModule:
        return _datamodule(self.dataset, self.data_root, self.num_clients, self.partition, self.alpha, self.seed,
                           self.batch_size, tuple(sorted(self.extra.items())))

    def __call__(self, context: Context) -> ClientPartition:
        k = _partition_id(context, self.num_clients)
        fdm = self.datamodule()
        return ClientPartition(k, fdm.client_dataset(k), fdm.client_indices(k), fdm.num_classes, fdm.batch_size)


@functools.lru_cache(maxsize=4)
def _datamodule(dataset, data_root, num_clients, partition, alpha, seed, batch_size, extra) -> FederatedDataModule:
    if dataset == "digits":
        train, test = load_digits_datasets(seed=seed)
    else:
        try:
            train, test = load_mnist(data_root)
        except (FileNotFoundError, OSError) as err:
            raise FlowerDataError(f"this node cannot read MNIST from data_root={data_root!r}: {err}") from err
    fdm = FederatedDataModule(train, test, num_clients=num_clients, partition=partition, alpha=alpha, seed=seed,
                              batch_size=batch_size, **dict(extra))
    fdm.setup("fit")
    return fdm


def _partition_id(context: Context, num_clients: int) -> int:
    if PARTITION_KEY not in context.node_config:
        raise FlowerDataError(
            f"this node has no {PARTITION_KEY!r} in its node config (it has {sorted(context.node_config)}), so it "
            f"cannot find its data partition; start it with --node-config \"{PARTITION_KEY}=<0..{num_clients - 1}>\""
        )
    k = context.node_config[PARTITION_KEY]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_clients:
        raise FlowerDataError(f"{PARTITION_KEY}={k!r} names no data partition; allowed ids are 0..{num_clients - 1}")
    return k


def save_partition(fdm: FederatedDataModule, client_id: int, path: str | os.PathLike) -> Path:
    """Write client ``client_id``'s shard (inputs, labels, global ids) for a real node's disk."""
    ds = fdm.client_dataset(client_id)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    blob = {"x": xs, "y": dataset_targets(ds), "sample_ids": torch.as_tensor(fdm.client_indices(client_id)),
            "client_id": int(client_id), "num_classes": int(fdm.num_classes), "batch_size": int(fdm.batch_size)}
    return save_torch(blob, path)


def file_partition(context: Context) -> ClientPartition:
    """Deployment: the shard at ``node_config["data-path"]`` (written by :func:`save_partition`)."""
    if DATA_PATH_KEY not in context.node_config:
        raise FlowerDataError(
            f"this node has no {DATA_PATH_KEY!r} in its node config (it has {sorted(context.node_config)}); start "
            f"it with --node-config \"{DATA_PATH_KEY}='/path/to/client.pt'\""
        )
    path = Path(str(context.node_config[DATA_PATH_KEY]))
    if not path.is_file():
        raise FlowerDataError(f"{DATA_PATH_KEY}={str(path)!r} does not exist on this node: it cannot reach its data")
    blob = load_torch_file(path, f"{DATA_PATH_KEY}")
    missing = [k for k in ("x", "y", "sample_ids", "client_id", "num_classes", "batch_size") if k not in blob]
    if missing:
        raise FlowerDataError(f"{DATA_PATH_KEY}={str(path)!r} is not a partition file: it lacks {missing}")
    dataset = TensorDataset(blob["x"], blob["y"])
    try:  # the node's data, checked once before it takes part: finite inputs, labels in range
        checked_targets(dataset, f"{DATA_PATH_KEY}={str(path)!r}", int(blob["num_classes"]))
    except ValueError as err:
        raise FlowerDataError(str(err)) from None
    return ClientPartition(int(blob["client_id"]), dataset, blob["sample_ids"].numpy(),
                           int(blob["num_classes"]), int(blob["batch_size"]))


def client_split(request: ForgetRequest, part: ClientPartition) -> ClientSplit:
    """The node's own forget/retain split, resolved locally (same result as ``FederatedDataModule.forget_plan``)."""
    targets = dataset_targets(part.dataset).numpy()
    if request.kind == "sample" and part.sample_ids is None:
        raise FlowerDataError(f"client {part.client_id}: a sample request names global sample ids, but this "
                              "partition does not know its global ids (ClientPartition.sample_ids is None)")
    forget = request.resolve(targets, sample_ids=part.sample_ids, clients=np.full(len(targets), part.client_id))
    return ClientSplit(part.client_id, np.flatnonzero(forget), np.flatnonzero(~forget))


def _takes_one_argument(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


# -- the app ------------------------------------------------------------------------------------------------
def make_client_app(
    model_fn: Callable[[], pl.LightningModule] | Callable[[Context], pl.LightningModule],
    partition_fn: Callable[[Context], ClientPartition] = file_partition,
    callbacks_fn: Callable[[], Sequence[Callback]] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    mods: Sequence[Callable] | None = None,
) -> ClientApp:
    """A ClientApp whose handlers are :class:`FederatedClient`'s, on the node's own partition.

    Message types: ``train`` (FedAvg: ``FederatedClient.fit``), ``query.hello`` (client id),
    ``query.deploy`` (keep the global model), ``query.score`` (``score``), ``query.bn_stats``
    (``bn_statistics``, after a reset), ``train.unlearn``
    (``masked_update``) and ``evaluate`` (local accuracy, split by the request when one is set).
    ``model_fn`` may take the node's ``Context`` (to read ``run_config``). ``model_fn``,
    ``partition_fn`` and ``callbacks_fn`` must pickle (module-level functions or small objects):
    Flower ships them to its worker processes. ``mods`` are Flower client mods (e.g.
    ``flwr.clientapp.mod.secaggplus_mod``), applied to every message.
    """
    app = ClientApp(mods=list(mods or []))
    takes_context = _takes_one_argument(model_fn)

    def client(message: Message, context: Context) -> tuple[FederatedClient, ClientPartition, Broadcast]:
        """The node's client, set up for a server message, and the message's broadcast."""
        broadcast, config = content_to_broadcast(message.content)
        part = partition_fn(context)
        callbacks = list(callbacks_fn()) if callbacks_fn is not None else []
        model = model_fn(context) if takes_context else model_fn()
        c = FederatedClient(part.client_id, part.dataset, model, part.batch_size, part.num_classes, callbacks,
                            trainer_kwargs)
        if "request" in config:
            request = ForgetRequest(**{k: v for k, v in json.loads(config["request"]).items() if k != "kind"})
            c.receive_request(request, client_split(request, part))
        if "deployed" in context.state:
            c.deployed = record_to_arrays(context.state["deployed"])
        return c, part, broadcast

    def reply(message: Message, content: RecordDict) -> Message:
        return Message(content, reply_to=message)

    def answer(message: Message, context: Context, handler: Callable[[FederatedClient, Broadcast], Any]) -> Message:
        """Reply with what a client method (``FederatedClient.fit``, ``.score``) returns for the broadcast."""
        c, _, broadcast = client(message, context)
        return reply(message, reply_to_content(handler(c, broadcast)))

    @app.query("hello")
    def hello(message: Message, context: Context) -> Message:
        part = partition_fn(context)
        return reply(message, RecordDict({"metrics": MetricRecord({"client-id": part.client_id,
                                                                    COUNT_KEY: len(part.dataset)})}))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return answer(message, context, FederatedClient.fit)

    @app.query("deploy")
    def deploy(message: Message, context: Context) -> Message:
        c, _, broadcast = client(message, context)
        c.deploy(broadcast)
        context.state["deployed"] = arrays_to_record(c.deployed)
        return reply(message, reply_to_content(None))

    @app.query("score")
    def score(message: Message, context: Context) -> Message:
        return answer(message, context, FederatedClient.score)

    @app.query("bn_stats")
    def bn_stats(message: Message, context: Context) -> Message:
        return answer(message, context, FederatedClient.bn_statistics)  # the broadcast carries the mask

    @app.train("unlearn")
    def unlearn(message: Message, context: Context) -> Message:
        c, _, broadcast = client(message, context)
        if broadcast.channels is not None:  # round 0 carries the mask; later rounds reuse the node's copy
            context.state["mask"] = channels_to_record(broadcast.channels)
        elif "mask" in context.state:
            broadcast = type(broadcast)(broadcast.arrays, broadcast.config, record_to_channels(context.state["mask"]))
        return reply(message, reply_to_content(c.masked_update(broadcast)))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        c, part, broadcast = client(message, context)
        set_arrays(c.model, broadcast.arrays)
        metrics: dict[str, float | int] = {COUNT_KEY: len(part.dataset)}
        splits = {"all": np.arange(len(part.dataset))}
        if c.split is not None:
            splits = {"forget": c.split.forget, "retain": c.split.retain}
        for name, idx in splits.items():
            if len(idx):
                loader = DataLoader(Subset(part.dataset, idx.tolist()), batch_size=256)
                metrics[f"{name}-acc"] = float(accuracy(c.model, loader, part.num_classes))
                metrics[f"{name}-examples"] = int(len(idx))
        return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))

    return app
