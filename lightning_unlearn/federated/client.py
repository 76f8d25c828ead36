"""Client side: the ``ClientApp`` whose handlers answer every server message, in process and deployed.

The work is done by plain functions of (model, arrays, data, config) -> (arrays, metrics)
(:func:`local_fit`, :func:`local_scores`, :func:`cdp_activations`, :func:`batchnorm_moments`);
:func:`make_client_app` wraps them in plain ``(Message, Context) -> Message`` handlers. What a node keeps
between messages (the deployed model, the channel mask) lives in ``context.state``, which Flower keeps per
node (and :class:`~lightning_unlearn.federated.grid.LocalGrid` per local node); the forget request travels
in each message's config and every node resolves its own split. Nothing but the upward messages of
:mod:`~lightning_unlearn.federated.messages` leaves a node.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lightning.pytorch.callbacks import Callback
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn._training import QUIET_TRAINER, fit, quiet_lightning
from lightning_unlearn.scoring import channel_scores, discover_layers
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.callbacks.learning_rate import ScaleLearningRate
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays, write_values
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.data.federated import ClientSplit
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.federated.messages import (
    COUNT_KEY, BatchNormStatsMessage, Broadcast, MaskedUpdateMessage, ParametersMessage, ScoresMessage,
    arrays_to_record, channels_to_record, content_to_broadcast, record_to_arrays, record_to_channels,
    reply_to_content, short_repr,
)
from lightning_unlearn.federated.partitions import ClientPartition, FlowerDataError, file_partition
from lightning_unlearn.federated.server import head_feature_key, statistic_masks
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.repair.calibration import fit_rows, head_features, linear_head, optimizer_recipe
from lightning_unlearn.repair.objectives import FORGET_AWARE
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.mask import ParameterMask, head_parameter_scales

log = logging.getLogger(__name__)


class _LocalTimer(Callback):
    """Time spent inside training epochs: the client's compute, as opposed to orchestration."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds += time.perf_counter() - self._t0


class _LoaderModule(pl.LightningDataModule):
    """One client's local training data as a LightningDataModule (seeded shuffling)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed))


def _trainer_kwargs(config: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict:
    kwargs = dict(base or {})
    for key in ("max_steps", "limit_train_batches"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    return kwargs


def local_fit(
    model: pl.LightningModule,
    arrays: Mapping[str, Tensor],
    datamodule: pl.LightningDataModule,
    config: Mapping[str, Any],
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: Mapping[str, Any] | None = None,
    param_lr_scale: Mapping[str, float] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Load ``arrays``, train with Lightning for ``config["epochs"]`` (or ``max_steps``), return new arrays.

    ``callbacks`` and ``trainer_kwargs`` (loggers, precision, ...) are the user's and apply to
    every local run. ``config["lr_scale"]`` multiplies the optimizer's learning rate for this fit;
    ``param_lr_scale`` (``{parameter name: factor}``) gives those parameters their own multiplier.
    Metrics: ``local_compute_s`` (inside the training loop) and ``fit_s``.
    """
    set_arrays(model, arrays)
    torch.manual_seed(int(config.get("seed", 0)))
    timer = _LocalTimer()
    if config.get("lr_scale", 1.0) != 1.0 or param_lr_scale:
        callbacks = [*callbacks, ScaleLearningRate(float(config.get("lr_scale", 1.0)), param_lr_scale)]
    start = time.perf_counter()
    with quiet_lightning():
        fit(model, datamodule, int(config.get("epochs", 1)), [*callbacks, timer], _trainer_kwargs(config, trainer_kwargs))
    return get_arrays(model), {"local_compute_s": timer.seconds, "fit_s": time.perf_counter() - start}


def local_scores(
    model: nn.Module, forget_loader: DataLoader, config: Mapping[str, Any], retain_loader: DataLoader | None = None
) -> ScoresMessage:
    """Channel scores of the deployed model on local forget data, as the message the server may see."""
    scores = channel_scores(
        model, forget_loader, config.get("method", "grad_x_act"), config.get("layers"), retain_loader,
        config.get("max_samples"), int(config.get("seed", 0)),
    )
    layers = {n: (i.out_channels, i.batchnorm, i.is_head) for n, i in scores.layers.items()}
    return ScoresMessage({n: s.float() for n, s in scores.items()}, scores.num_samples, scores.method, layers)


@torch.no_grad()
def cdp_activations(model: nn.Module, loader: DataLoader, layers: Mapping[str, Any], max_samples: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Mean post-ReLU activation per channel (after the layer's BatchNorm when it has one), CDP's statistic."""
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def run(_, __, out):
            a = torch.relu(out).reshape(out.shape[0], out.shape[1], -1).mean(-1).sum(0).double()
            sums[name] = sums.get(name, 0) + a
        return run

    for name, info in layers.items():
        bn = info[1] if isinstance(info, tuple) else info.batchnorm
        handles.append(modules[bn or name].register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for x, *_ in loader:
            if max_samples is not None and count >= max_samples:
                break
            model(x.to(next(model.parameters()).device))
            count += x.shape[0]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: (s / max(count, 1)).float() for n, s in sums.items()}, count


@torch.no_grad()
def batchnorm_moments(
    model: nn.Module, mask: ParameterMask, batches: Iterable, max_batches: int
) -> tuple[dict[str, Tensor], int]:
    """Count, sum and sum of squares of each selected BatchNorm channel's input over at most ``max_batches``.

    The model runs in evaluation mode, except that the selected channels (whose running statistics are
    being estimated) are normalised with the batch's own statistics, as BatchNorm training does; every
    other channel uses its running statistics, exactly as the final model will. Returns
    ``({bn name: float64 (3, k)}, samples forwarded)``: the payload of a :class:`BatchNormStatsMessage`.
    """
    channels = selected_batchnorm_channels(model, mask)
    modules = dict(model.named_modules())
    moments = {bn: torch.zeros(3, int(sel.sum()), dtype=torch.float64) for bn, sel in channels.items()}
    device = next(model.parameters()).device

    def hook(bn: str, sel: Tensor):
        def run(module, args, out):
            x = args[0][:, sel]
            values = x.transpose(0, 1).reshape(x.shape[1], -1).double()
            moments[bn] += torch.stack([torch.full_like(values[:, 0], values.shape[1]), values.sum(1),
                                        values.square().sum(1)]).cpu()
            weight = module.weight[sel] if module.weight is not None else None
            bias = module.bias[sel] if module.bias is not None else None
            out = out.clone()
            out[:, sel] = F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)
            return out
        return run

    handles = [modules[bn].register_forward_hook(hook(bn, sel.to(device))) for bn, sel in channels.items()]
    was_training = model.training
    model.eval()
    samples = 0
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            samples += int(x.shape[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return moments, samples


# -- the node: its data and what it keeps ------------------------------------------------------------------
def client_split(request: ForgetRequest, part: ClientPartition) -> ClientSplit:
    """The node's own forget/retain split, resolved locally (same result as ``FederatedDataModule.forget_plan``)."""
    targets = dataset_targets(part.dataset).numpy()
    if request.kind == "sample" and part.sample_ids is None:
        raise FlowerDataError(f"client {part.client_id}: a sample request names global sample ids, but this "
                              "partition does not know its global ids (ClientPartition.sample_ids is None)")
    forget = request.resolve(targets, sample_ids=part.sample_ids, clients=np.full(len(targets), part.client_id))
    return ClientSplit(part.client_id, np.flatnonzero(forget), np.flatnonzero(~forget))


class _Node:
    """One message's view of a node: its partition, model, split (when the message names a request) and state."""

    def __init__(self, part: ClientPartition, model: pl.LightningModule, context: Context, config: Mapping[str, Any],
                 callbacks: Sequence[Callback], trainer_kwargs: Mapping[str, Any] | None) -> None:
        self.part, self.model, self.state, self.config = part, model, context.state, config
        self.callbacks, self.trainer_kwargs = [*callbacks, *part.callbacks], trainer_kwargs
        self.split = None
        if "request" in config:
            request = ForgetRequest(**{k: v for k, v in json.loads(config["request"]).items() if k != "kind"})
            self.request, self.split = request, client_split(request, part)

    def subset(self, which: str) -> Dataset:
        if self.split is None or which == "all":
            return self.part.dataset
        return Subset(self.part.dataset, getattr(self.split, which).tolist())

    def loader(self, dataset: Dataset, shuffle: bool = False, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.part.batch_size, shuffle=shuffle, generator=gen)

    def deployed(self) -> dict[str, Tensor]:
        if "deployed" not in self.state:
            raise RuntimeError(f"client {self.part.client_id} holds no global model yet: run FedAvg (or deploy) first")
        return record_to_arrays(self.state["deployed"])

    @functools.cached_property
    def layers(self):
        x = self.part.dataset[0][0]
        return discover_layers(self.model, x.unsqueeze(0).repeat(2, *([1] * x.dim())))

    def mask(self, broadcast: Broadcast) -> tuple[ParameterMask, ParameterMask | None]:
        """The channel mask (sent with the first masked message, then kept in ``context.state``) and, in
        ``"prune"`` mode (CDP), the pruned channels."""
        if broadcast.channels is not None:
            self.state["mask"] = channels_to_record(broadcast.channels)
        if "mask" not in self.state:
            raise RuntimeError(f"client {self.part.client_id}: a masked round needs the channel mask (sent with round 0)")
        selected = ParameterMask.from_channels(self.model, record_to_channels(self.state["mask"]), self.layers)
        if self.config.get("mode", "train") == "prune":
            return ParameterMask({n: ~m for n, m in selected.masks.items()}, selected.channels), selected
        return selected, None

    @functools.cached_property
    def head(self) -> str:
        heads = [n for n, i in self.layers.items() if i.is_head]
        if not heads:
            raise ValueError(f"client {self.part.client_id}: the model has no classifier head to calibrate")
        return heads[0]

    def head_rows(self, mask: ParameterMask, rows: Sequence[int]) -> ParameterMask:
        """The head calibration's mask: head rows ``rows`` only, which must lie inside ``mask`` (the values sent)."""
        trained = ParameterMask.from_channels(self.model, {self.head: [int(r) for r in rows]}, {})
        if any(bool((m & ~mask.masks[k]).any()) for k, m in trained.masks.items()):
            raise ValueError(f"client {self.part.client_id}: calibration rows {list(rows)} of {self.head!r} are not "
                             "inside the channel mask")
        return trained

    def start(self, mask: ParameterMask, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The deployed arrays with the broadcast selected values written in: parameter slices, and (after a
        reset) the running statistics of the selected BatchNorm channels. Any other key is refused."""
        statistics = statistic_masks(selected_batchnorm_channels(self.model, mask)) if values else {}
        params = {k: v for k, v in values.items() if k in mask.masks and bool(mask.masks[k].any())}
        start = write_values(self.deployed(), mask, params)
        for key, v in values.items():
            if key in params:
                continue
            if key not in statistics or v.numel() != int(statistics[key].sum()):
                raise ValueError(f"client {self.part.client_id}: broadcast value {short_repr(key)} ({v.numel()} "
                                 "values) is neither a selected parameter slice nor a selected BatchNorm statistic")
            start[key][statistics[key]] = v.to(start[key].dtype)
        return start


# -- handlers ------------------------------------------------------------------------------------------------
def _fit(node: _Node, b: Broadcast) -> ParametersMessage | None:
    """FedAvg local training (``config["data"]``: ``"all"`` or ``"retain"``)."""
    data = node.subset(b.config.get("data", "all"))
    if len(data) == 0:
        return None
    dm = _LoaderModule(data, node.part.batch_size, int(b.config.get("seed", 0)))
    arrays, metrics = local_fit(node.model, b.arrays, dm, b.config, node.callbacks, node.trainer_kwargs)
    return ParametersMessage(arrays, len(data), metrics)


def _score(node: _Node, b: Broadcast) -> ScoresMessage | None:
    """Explain the deployed model on local forget data (nothing to send without forget data)."""
    if node.split is None or not len(node.split.forget):
        return None
    set_arrays(node.model, node.deployed())
    retain = node.loader(node.subset("retain")) if b.config.get("contrast") and len(node.split.retain) else None
    return local_scores(node.model, node.loader(node.subset("forget")), b.config, retain)


def _cdp(node: _Node, b: Broadcast) -> ScoresMessage | None:
    """CDP: per-channel mean activations on one local document (``config["document"]``: the forget set or
    ``class_<c>`` of the retain set); nothing to send when the node holds none of it."""
    set_arrays(node.model, node.deployed())
    layers = {n: i for n, i in node.layers.items() if not i.is_head}
    doc = b.config["document"]
    data = node.subset("forget" if doc == "forget" else "retain")
    if doc != "forget":
        data = Subset(data, np.flatnonzero(dataset_targets(data).numpy() == int(doc.split("_")[1])).tolist())
    if not len(data):
        return None
    acts, n = cdp_activations(node.model, node.loader(data), layers, b.config.get("max_samples"))
    meta = {n_: (i.out_channels, i.batchnorm, i.is_head) for n_, i in layers.items()}
    return ScoresMessage(acts, n, "cdp_activation", meta, tag=doc)


def _bn_stats(node: _Node, b: Broadcast) -> BatchNormStatsMessage | None:
    """After a reset: the input moments of the selected BatchNorm channels on at most ``config["max_batches"]``
    shuffled (``config["seed"]``) local retain batches (:func:`batchnorm_moments`)."""
    mask, _ = node.mask(b)
    if node.split is not None and not len(node.split.retain):
        return None
    set_arrays(node.model, node.start(mask, b.arrays))
    loader = node.loader(node.subset("retain"), shuffle=True, seed=int(b.config.get("seed", 0)))
    t0 = time.perf_counter()
    moments, n = batchnorm_moments(node.model, mask, loader, int(b.config.get("max_batches", 20)))
    return BatchNormStatsMessage(moments, n, {"local_compute_s": time.perf_counter() - t0})


def _head_features(node: _Node, b: Broadcast) -> BatchNormStatsMessage:
    """Head calibration: per forgotten class (``config["classes"]``) the count, sum and sum of squares of the head's
    input over the local forget samples of that class, on the deployed model with the broadcast selected values
    (the model after the masked rounds). A node without forget data sends zeros, so every node answers alike."""
    mask, _ = node.mask(b)
    head = linear_head(node.model, node.head)
    classes = [int(c) for c in b.config["classes"]]
    moments = {head_feature_key(c): torch.zeros(3, head.in_features, dtype=torch.float64) for c in classes}
    t0, samples = time.perf_counter(), 0
    if node.split is not None and len(node.split.forget):
        set_arrays(node.model, node.start(mask, b.arrays))
        feats, labels = head_features(node.model, head, node.loader(node.subset("forget")))
        for c in classes:
            x = feats[labels == c].double().cpu()
            moments[head_feature_key(c)] = torch.stack([torch.full((x.shape[1],), float(len(x)), dtype=torch.float64),
                                                        x.sum(0), x.square().sum(0)])
            samples += len(x)
    return BatchNormStatsMessage(moments, samples, {"local_compute_s": time.perf_counter() - t0})


def _module_optimizer(model: pl.LightningModule, data: Any) -> torch.optim.Optimizer:
    """The first optimizer ``configure_optimizers`` returns (an optimizer, a list or tuple of them, or a dict or
    a pair of lists with schedulers, as Lightning accepts). A ``configure_optimizers`` that needs its Trainer (a
    scheduler sized by ``estimated_stepping_batches``) gets one: a Lightning fit of a copy on ``data`` that stops
    before its first batch, so the optimizer is built as in training and ``model`` is not touched."""
    try:
        out = model.configure_optimizers()
    except Exception as error:  # noqa: BLE001 - whatever the user's code raises without a Trainer
        log.debug("configure_optimizers needs a Trainer (%s): building it inside a fit stopped before any batch", error)
        trainer = pl.Trainer(**{**QUIET_TRAINER, "max_epochs": 1, "callbacks": [_StopBeforeTheFirstBatch()]})
        trainer.fit(copy.deepcopy(model), DataLoader(data, batch_size=64))
        return trainer.optimizers[0]
    while isinstance(out, (list, tuple)) and out:
        out = out[0]
    if isinstance(out, dict):
        out = out["optimizer"]
    if not isinstance(out, torch.optim.Optimizer):
        raise ValueError(f"the head calibration needs configure_optimizers to return a torch optimizer, got "
                         f"{type(out).__name__}; allowed: an optimizer, a list of them, or Lightning's dict form")
    return out


class _StopBeforeTheFirstBatch(pl.Callback):
    """Stops a fit once its optimizers exist, before the first batch (``should_stop`` set at train start)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def _local_epoch_steps(batches: int, trainer_kwargs: Mapping[str, Any] | None) -> int:
    """Steps of one local epoch of ``batches`` batches under the clients' Trainer options (``limit_train_batches``
    and ``max_steps``, as Lightning counts them), the length of a Lightning calibration round."""
    kwargs = trainer_kwargs or {}
    limit = kwargs.get("limit_train_batches")
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif isinstance(limit, int):
        batches = min(batches, limit)
    max_steps = kwargs.get("max_steps")
    if isinstance(max_steps, int) and max_steps >= 0:
        batches = min(batches, max_steps)
    return batches


def _retain_head_features(node: _Node, start: Mapping[str, Tensor], head: str) -> tuple[Tensor, Tensor]:
    """The head's inputs and labels on the node's retain data for model ``start``, computed once per body: kept in
    ``context.state`` under a digest of every array but the head's (the calibration rounds change only head rows)
    and of the request, so later rounds of the same calibration reuse them."""
    digest = hashlib.sha256(node.config.get("request", "").encode())
    for name in sorted(start):
        if name not in (f"{head}.weight", f"{head}.bias"):
            digest.update(name.encode())
            digest.update(start[name].detach().cpu().contiguous().numpy().tobytes())
    key = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
    cached = record_to_arrays(node.state["head_features"]) if "head_features" in node.state else None
    if cached is not None and torch.equal(cached["key"], key):
        return cached["x"], cached["y"]
    set_arrays(node.model, start)
    x, y = head_features(node.model, linear_head(node.model, head), node.loader(node.subset("retain")))
    node.state["head_features"] = arrays_to_record({"key": key, "x": x, "y": y})
    return x, y


def _calibration_update(node: _Node, start: dict[str, Tensor], rows_mask: ParameterMask,
                        cfg: Mapping[str, Any]) -> MaskedUpdateMessage:
    """A head-calibration round as the central :func:`~lightning_unlearn.repair.calibrate_head` fits: the rows the
    server sent, fitted by :func:`~lightning_unlearn.repair.calibration.fit_rows` on the retain head features
    (computed once per body, :func:`_retain_head_features`) for one local epoch (the clients' ``max_steps`` /
    ``limit_train_batches`` apply, as to a Lightning epoch), shuffled by ``config["seed"]``. The optimizer is the
    module's own class and settings (``optimizer_recipe``), fresh every round, as the Lightning rounds it replaces
    (each a new ``Trainer.fit``) had it; the server re-averages the rows between rounds. No autograd through the
    model and no Lightning fit: the user's callbacks do not run in these rounds."""
    t0 = time.perf_counter()
    head = linear_head(node.model, node.head)
    rows = [int(r) for r in cfg["train_rows"]]
    x, y = _retain_head_features(node, start, node.head)
    set_arrays(node.model, start)
    weight = start[f"{node.head}.weight"][rows].float().to(head.weight.device).requires_grad_(True)
    bias = start[f"{node.head}.bias"][rows].float().to(head.weight.device).requires_grad_(True) \
        if head.bias is not None else None
    optimizer = optimizer_recipe(_module_optimizer(node.model, node.subset("retain")))([weight] + ([bias] if bias is not None else []))
    bs = node.part.batch_size
    steps = _local_epoch_steps(-(-len(x) // bs), node.trainer_kwargs)
    fit_start = time.perf_counter()
    fit_rows(head, rows, weight, bias, x, y, optimizer, steps, bs, torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    with torch.no_grad():
        start[f"{node.head}.weight"][rows] = weight.detach().to(start[f"{node.head}.weight"].dtype).cpu()
        if bias is not None:
            start[f"{node.head}.bias"][rows] = bias.detach().to(start[f"{node.head}.bias"].dtype).cpu()
    metrics = {"local_compute_s": time.perf_counter() - fit_start, "fit_s": time.perf_counter() - t0}
    return MaskedUpdateMessage(selected_values(start, rows_mask), len(node.subset("retain")), metrics)


def _masked_update(node: _Node, b: Broadcast) -> MaskedUpdateMessage | None:
    """A masked local round from the deployed model with the broadcast selected values. ``config["mode"]``:
    ``"train"`` updates the selected channels; ``"prune"`` (CDP) zeroes them and updates everything else.
    Nodes without retain data send nothing."""
    mask, pruned = node.mask(b)
    if node.split is not None and not len(node.split.retain):
        return None
    start = node.start(mask, b.arrays)
    for n, m in (pruned.masks.items() if pruned is not None else ()):
        if bool(m.any()):
            start[n] = torch.where(m, torch.zeros_like(start[n]), start[n])
    cfg, seed = b.config, int(b.config.get("seed", 0))
    if cfg.get("train_rows") is not None:  # head calibration: the values of ``mask`` arrive, only these rows train
        return _calibration_update(node, start, node.head_rows(mask, cfg["train_rows"]), cfg)
    objective = cfg.get("objective", "retain")
    if objective in FORGET_AWARE and node.split is not None and len(node.split.forget):
        dm = UnlearningDataModule(node.part.dataset, node.part.dataset, node.request, node.part.batch_size, seed=seed,
                                  num_classes=node.part.num_classes, forget_indices=node.split.forget)
        callback: Callback = SelectiveUnlearning(mask=mask, log_metrics=False, objective=objective, seed=seed,
                                                 epochs=int(cfg.get("epochs", 1)),
                                                 forget_weight=float(cfg.get("forget_weight", 1.0)),
                                                 bn_stats=cfg.get("bn_stats", "frozen"))
    else:
        dm = _LoaderModule(node.subset("retain"), node.part.batch_size, seed)
        callback = GradientMask(mask, bn_stats=cfg.get("bn_stats", "frozen"))
    scales = head_parameter_scales(mask, node.layers, cfg.get("head_lr_scale")) or None
    arrays, metrics = local_fit(node.model, start, dm, cfg, [*node.callbacks, callback], node.trainer_kwargs, scales)
    return MaskedUpdateMessage(selected_values(arrays, mask), len(node.subset("retain")), metrics)


def _evaluate(node: _Node, b: Broadcast) -> RecordDict:
    """Local accuracy of the broadcast model, split into forget / retain data when the message names a request."""
    set_arrays(node.model, b.arrays)
    metrics: dict[str, float | int] = {COUNT_KEY: len(node.part.dataset)}
    splits = {"all": np.arange(len(node.part.dataset))}
    if node.split is not None:
        splits = {"forget": node.split.forget, "retain": node.split.retain}
    for name, idx in splits.items():
        if len(idx):
            loader = DataLoader(Subset(node.part.dataset, idx.tolist()), batch_size=256)
            metrics[f"{name}-acc"] = float(accuracy(node.model, loader, node.part.num_classes))
            metrics[f"{name}-examples"] = int(len(idx))
    return RecordDict({"metrics": MetricRecord(metrics)})


#: message type -> handler; every handler gets the node's view and the decoded broadcast.
HANDLERS: dict[str, Callable[[_Node, Broadcast], Any]] = {
    "train": _fit, "query.score": _score, "query.cdp": _cdp, "query.bn_stats": _bn_stats,
    "train.unlearn": _masked_update, "query.head_features": _head_features,
}


def _takes_one_argument(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


def make_client_app(
    model_fn: Callable[[], pl.LightningModule] | Callable[[Context], pl.LightningModule],
    partition_fn: Callable[[Context], ClientPartition] | None = None,
    callbacks_fn: Callable[[], Sequence[Callback]] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    mods: Sequence[Callable] | None = None,
) -> ClientApp:
    """The ClientApp of the protocol, on the node's own partition (``partition_fn(context)``).

    Message types: ``train`` (FedAvg), ``query.hello`` (client id), ``query.deploy`` (keep the global model),
    ``query.score``, ``query.cdp`` (CDP's statistic), ``query.bn_stats`` (after a reset), ``train.unlearn``
    (a masked round), ``query.head_features`` (head calibration) and ``evaluate``. ``partition_fn`` (default: the
    shard file of a deployed node,
    :func:`~lightning_unlearn.federated.partitions.file_partition`) finds the node's data; ``model_fn`` may take
    the node's ``Context`` (to read ``run_config``).
    ``model_fn``, ``partition_fn`` and ``callbacks_fn`` must pickle for Flower's worker processes
    (module-level functions or small objects). ``mods`` are Flower client mods, applied to every message.
    """
    partition_fn = partition_fn or file_partition
    app = ClientApp(mods=list(mods or []))
    takes_context = _takes_one_argument(model_fn)

    def node(message: Message, context: Context) -> tuple[_Node, Broadcast]:
        broadcast, config = content_to_broadcast(message.content)
        model = model_fn(context) if takes_context else model_fn()
        callbacks = list(callbacks_fn()) if callbacks_fn is not None else []
        return _Node(partition_fn(context), model, context, config, callbacks, trainer_kwargs), broadcast

    def handle(message: Message, context: Context) -> Message:
        n, broadcast = node(message, context)
        return Message(reply_to_content(HANDLERS[message.metadata.message_type](n, broadcast)), reply_to=message)

    for kind in HANDLERS:
        category, _, action = kind.partition(".")
        getattr(app, category)(*([action] if action else []))(handle)

    @app.query("hello")
    def hello(message: Message, context: Context) -> Message:
        part = partition_fn(context)
        return Message(RecordDict({"metrics": MetricRecord({"client-id": part.client_id, COUNT_KEY: len(part.dataset)})}),
                       reply_to=message)

    @app.query("deploy")
    def deploy(message: Message, context: Context) -> Message:
        broadcast, _ = content_to_broadcast(message.content)
        context.state["deployed"] = arrays_to_record(broadcast.arrays)
        return Message(reply_to_content(None), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(_evaluate(*node(message, context)), reply_to=message)

    return app
