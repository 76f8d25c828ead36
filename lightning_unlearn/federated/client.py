"""Client side: the ``ClientApp`` whose handlers answer every server message, in process and deployed. What a
node keeps between messages (the deployed model, the channel mask) lives in ``context.state``; nothing but the
replies of :func:`~lightning_unlearn.federated.messages.up` leaves a node."""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lightning.pytorch.callbacks import Callback, LambdaCallback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn._training import QUIET_TRAINER, SeededData, fit, quiet_lightning
from lightning_unlearn.callbacks.divergence import DivergenceError, DivergenceGuard
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.callbacks.learning_rate import ScaleLearningRate
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.data.federated import ClientSplit
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.federated.messages import CDP_METHOD, COUNT_KEY, read_down, short_repr, up
from lightning_unlearn.federated.partitions import ClientPartition, FlowerDataError, file_partition
from lightning_unlearn.federated.server import head_feature_key, statistic_masks
from lightning_unlearn.mask import (
    BN_TYPES, ParameterMask, get_arrays, head_parameter_scales, selected_values, set_arrays,
)
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.repair.calibration import fit_rows, head_features, linear_head, optimizer_recipe
from lightning_unlearn.repair.objectives import FORGET_AWARE
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.scoring import channel_scores, discover_layers
from lightning_unlearn.scoring.base import channels_first
from lightning_unlearn.scoring.layers import LayerInfo

log = logging.getLogger(__name__)


def local_fit(model: pl.LightningModule, arrays: Mapping[str, Tensor], datamodule: pl.LightningDataModule,
              config: Mapping[str, Any], callbacks: Sequence[Callback] = (),
              trainer_kwargs: Mapping[str, Any] | None = None,
              param_lr_scale: Mapping[str, float] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Load ``arrays``, train with Lightning for ``config["epochs"]`` (or ``max_steps``), return the new arrays
    and the seconds of training and of the fit. ``lr_scale`` / ``param_lr_scale`` scale the learning rates."""
    set_arrays(model, arrays)
    torch.manual_seed(int(config.get("seed", 0)))
    # seconds inside training epochs, the client's compute (Lightning's Timer would clash with the user's max_time)
    epoch_s: list[float] = []  # each epoch's start time, replaced by its duration at its end
    timer = LambdaCallback(on_train_epoch_start=lambda *_: epoch_s.append(time.perf_counter()),
                           on_train_epoch_end=lambda *_: epoch_s.append(time.perf_counter() - epoch_s.pop()))
    lr_scale = float(config.get("lr_scale", 1.0))
    if lr_scale != 1.0 or param_lr_scale:
        callbacks = [*callbacks, ScaleLearningRate(lr_scale, param_lr_scale)]
    kwargs = {**(trainer_kwargs or {}),
              **{k: config[k] for k in ("max_steps", "limit_train_batches") if config.get(k) is not None}}
    start = time.perf_counter()
    with quiet_lightning():
        fit(model, datamodule, int(config.get("epochs", 1)), [*callbacks, timer], kwargs)
    return get_arrays(model), {"local_compute_s": sum(epoch_s), "fit_s": time.perf_counter() - start}


def _layer_table(layers: Mapping[str, LayerInfo]) -> dict[str, tuple[int, str | None, bool]]:
    return {n: (i.out_channels, i.batchnorm, i.is_head) for n, i in layers.items()}


@torch.no_grad()
def _forward(model: nn.Module, hooks: Sequence[tuple[nn.Module, Callable]], batches: Iterable) -> int:
    """Forward ``batches`` in eval mode with forward ``hooks`` on (mode and hooks put back); the samples forwarded."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    count, device, modes = 0, next(model.parameters()).device, eval_modes(model)
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(x.to(device))
            count += int(x.shape[0])
    finally:
        restore_modes(modes)
        for h in handles:
            h.remove()
    return count


def cdp_activations(model: nn.Module, loader: DataLoader, layers: Mapping[str, LayerInfo],
                    max_samples: int | None = None) -> tuple[dict[str, Tensor], int]:
    """Mean post-ReLU activation per channel (after the layer's BatchNorm when it has one), CDP's statistic, over
    the batches that reach ``max_samples``."""
    modules, sums = dict(model.named_modules()), {}

    def hook(name: str, module: nn.Module, _, out: Tensor) -> None:
        out = torch.relu(channels_first(module, out))  # a Linear's channels are last (over tokens)
        sums[name] = sums.get(name, 0) + out.reshape(*out.shape[:2], -1).mean(-1).sum(0).double()

    hooks = [(modules[i.batchnorm or n], functools.partial(hook, n)) for n, i in layers.items()]
    batches = loader if max_samples is None else itertools.islice(loader, -(-max_samples // loader.batch_size))
    count = _forward(model, hooks, batches)
    return {n: (s / max(count, 1)).float() for n, s in sums.items()}, count


def _moments(x: Tensor, dim: int) -> Tensor:
    """Count, sum and sum of squares of float64 ``x`` along ``dim`` (summed over clients, they pool exactly)."""
    total = x.sum(dim)
    return torch.stack([torch.full_like(total, x.shape[dim]), total, x.square().sum(dim)])


def batchnorm_moments(model: nn.Module, mask: ParameterMask, batches: Iterable,
                      max_batches: int) -> tuple[dict[str, Tensor], int]:
    """Moments of each selected BatchNorm channel's input over at most ``max_batches`` (``{bn: float64 (3, k)}``,
    samples), the model in eval mode but for the selected channels, normalised by the batch as in training."""
    channels = selected_batchnorm_channels(model, mask)
    modules, device = dict(model.named_modules()), next(model.parameters()).device
    moments = {bn: torch.zeros(3, int(sel.sum()), dtype=torch.float64) for bn, sel in channels.items()}

    def hook(bn: str, sel: Tensor, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0][:, sel]
        moments[bn] += _moments(x.transpose(0, 1).reshape(x.shape[1], -1).double(), 1).cpu()
        weight, bias = (module.weight[sel], module.bias[sel]) if module.affine else (None, None)
        out = out.clone()
        out[:, sel] = F.batch_norm(x, None, None, weight, bias, True, 0.0, module.eps)
        return out

    hooks = [(modules[bn], functools.partial(hook, bn, sel.to(device))) for bn, sel in channels.items()]
    return moments, _forward(model, hooks, itertools.islice(batches, max_batches))


def client_split(request: ForgetRequest, part: ClientPartition) -> ClientSplit:
    """The node's own forget/retain split, resolved locally (same result as ``FederatedDataModule.forget_plan``)."""
    targets = part.targets
    if request.kind == "sample" and part.sample_ids is None:
        raise FlowerDataError(f"client {part.client_id}: a sample request names global sample ids, but this "
                              "partition does not know its global ids (ClientPartition.sample_ids is None)")
    forget = request.resolve(targets, sample_ids=part.sample_ids, clients=np.full(len(targets), part.client_id))
    return ClientSplit(part.client_id, np.flatnonzero(forget), np.flatnonzero(~forget))


class _Node:
    """One message's view of a node: partition, model, the message's content, ``context.state`` and split."""

    def __init__(self, part: ClientPartition, model: pl.LightningModule, context: Context, content: RecordDict,
                 callbacks: Sequence[Callback], trainer_kwargs: Mapping[str, Any] | None) -> None:
        self.part, self.model, self.state = part, model, context.state
        self.arrays, self.config, self.channels = read_down(content)
        self.callbacks, self.trainer_kwargs = [*callbacks, *part.callbacks], trainer_kwargs
        self.request, self.split = None, None
        if "request" in self.config:
            self.request = ForgetRequest(**{k: v for k, v in json.loads(self.config["request"]).items() if k != "kind"})
            self.split = client_split(self.request, part)

    def subset(self, which: str) -> Dataset:
        """``"all"``, ``"forget"`` or ``"retain"`` (all of the node's data when the message names no request)."""
        if self.split is None or which == "all":
            return self.part.dataset
        return Subset(self.part.dataset, getattr(self.split, which).tolist())

    def loader(self, data: str | Dataset, shuffle: bool = False, seed: int = 0) -> DataLoader:
        data = self.subset(data) if isinstance(data, str) else data
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(data, batch_size=self.part.batch_size, shuffle=shuffle, generator=gen)

    def deployed(self) -> dict[str, Tensor]:
        if "deployed" not in self.state:
            raise RuntimeError(f"client {self.part.client_id} holds no global model yet: run FedAvg (or deploy) first")
        return dict(self.state["deployed"].to_torch_state_dict())

    @functools.cached_property
    def layers(self) -> dict[str, LayerInfo]:
        x = self.part.dataset[0][0]
        return discover_layers(self.model, x.unsqueeze(0).repeat(2, *([1] * x.dim())))

    @property
    def head(self) -> str | None:  # None: ``linear_head`` refuses it in one line
        return next((n for n, i in self.layers.items() if i.is_head), None)

    def mask(self) -> ParameterMask:
        """The selected channels (sent once, kept in ``context.state``)."""
        if self.channels is not None:
            self.state["mask"] = ArrayRecord({k: torch.tensor(v, dtype=torch.int32) for k, v in self.channels.items()})
        if "mask" not in self.state:
            raise RuntimeError(f"client {self.part.client_id}: a masked round needs the channel mask "
                               "(sent with round 0)")
        channels = {k: v.tolist() for k, v in self.state["mask"].to_torch_state_dict().items()}
        return ParameterMask.from_channels(self.model, channels, self.layers)

    def start(self, mask: ParameterMask) -> dict[str, Tensor]:
        """The deployed arrays with the broadcast selected slices and (after a reset) BatchNorm statistics."""
        start, values = self.deployed(), self.arrays
        where = {**statistic_masks(selected_batchnorm_channels(self.model, mask)), **mask.masks} if values else {}
        for key, v in values.items():
            if key not in where or v.numel() != int(where[key].sum()) or not v.numel():
                raise ValueError(f"client {self.part.client_id}: broadcast value {short_repr(key)} ({v.numel()} "
                                 "values) is neither a selected parameter slice nor a selected BatchNorm statistic")
            start[key][where[key]] = v.to(start[key].dtype)
        return start


# -- handlers: node -> reply content (None: nothing to send) ----------------------------------------------------
def _fit(node: _Node) -> RecordDict | None:
    """FedAvg local training (``config["data"]``: ``"all"`` or ``"retain"``)."""
    data = node.subset(node.config.get("data", "all"))
    if len(data) == 0:
        return None
    dm = SeededData(data, node.part.batch_size, int(node.config.get("seed", 0)))
    arrays, metrics = local_fit(node.model, node.arrays, dm, node.config, node.callbacks, node.trainer_kwargs)
    return up("parameters", arrays, len(data), metrics)


def _score(node: _Node) -> RecordDict | None:
    """Channel scores of the deployed model on local forget data (nothing to send without forget data)."""
    if node.split is None or not len(node.split.forget):
        return None
    set_arrays(node.model, node.deployed())
    cfg = node.config
    retain = node.loader("retain") if cfg.get("contrast") and len(node.split.retain) else None
    scores = channel_scores(node.model, node.loader("forget"), cfg.get("method", "grad_x_act"), cfg.get("layers"),
                            retain, cfg.get("max_samples"), int(cfg.get("seed", 0)))
    return up("scores", {n: s.float() for n, s in scores.items()}, scores.num_samples, method=scores.method,
              tag="forget", layers=_layer_table(scores.layers))


def _cdp(node: _Node) -> RecordDict | None:
    """CDP: mean channel activations on one local document, the forget set or ``class_<c>`` of the retain set."""
    doc = node.config["document"]
    if doc == "forget":
        data = node.subset("forget")
    else:  # the retained samples of class ``c``, in the retain set's order
        retain = node.split.retain if node.split is not None else np.arange(len(node.part.dataset))
        data = Subset(node.part.dataset, retain[node.part.targets[retain] == int(doc.split("_")[1])].tolist())
    if not len(data):
        return None
    set_arrays(node.model, node.deployed())
    layers = {n: i for n, i in node.layers.items() if not i.is_head}
    acts, n = cdp_activations(node.model, node.loader(data), layers, node.config.get("max_samples"))
    return up("scores", acts, n, method=CDP_METHOD, tag=doc, layers=_layer_table(layers))


def _bn_stats(node: _Node) -> RecordDict | None:
    """After a reset: the selected BatchNorm channels' input moments on shuffled local retain batches."""
    mask = node.mask()
    if node.split is not None and not len(node.split.retain):
        return None
    set_arrays(node.model, node.start(mask))
    loader = node.loader("retain", shuffle=True, seed=int(node.config.get("seed", 0)))
    t0 = time.perf_counter()
    moments, n = batchnorm_moments(node.model, mask, loader, int(node.config.get("max_batches", 20)))
    return up("bn_stats", moments, n, {"local_compute_s": time.perf_counter() - t0})


def _head_features(node: _Node) -> RecordDict:
    """Head calibration: per forgotten class the moments of the head's input on local forget samples (or zeros)."""
    mask = node.mask()
    head = linear_head(node.model, node.head)
    classes = [int(c) for c in node.config["classes"]]
    moments = {head_feature_key(c): torch.zeros(3, head.in_features, dtype=torch.float64) for c in classes}
    t0, samples = time.perf_counter(), 0
    if node.split is not None and len(node.split.forget):
        set_arrays(node.model, node.start(mask))
        feats, labels = head_features(node.model, head, node.loader("forget"))
        for c in classes:
            x = feats[labels == c].double().cpu()
            moments[head_feature_key(c)] = _moments(x, 0)
            samples += len(x)
    return up("bn_stats", moments, samples, {"local_compute_s": time.perf_counter() - t0})


def _module_optimizer(model: pl.LightningModule, data: Any) -> torch.optim.Optimizer:
    """The first optimizer ``configure_optimizers`` returns; one that needs its Trainer (a scheduler sized by
    ``estimated_stepping_batches``) comes from a fit of a copy on ``data`` stopped before its first batch."""
    try:
        out = model.configure_optimizers()
    except Exception as error:  # noqa: BLE001 - whatever the user's code raises without a Trainer
        log.debug("configure_optimizers needs a Trainer (%s): building it inside a fit stopped before any batch", error)
        stop = LambdaCallback(on_train_start=lambda trainer, _: setattr(trainer, "should_stop", True))
        trainer = pl.Trainer(**{**QUIET_TRAINER, "max_epochs": 1, "callbacks": [stop]})
        trainer.fit(copy.deepcopy(model), DataLoader(data, batch_size=64))
        return trainer.optimizers[0]
    while isinstance(out, (list, tuple)) and out:
        out = out[0]
    out = out["optimizer"] if isinstance(out, dict) else out
    if not isinstance(out, torch.optim.Optimizer):
        raise ValueError(f"the head calibration needs configure_optimizers to return a torch optimizer, got "
                         f"{type(out).__name__}; allowed: an optimizer, a list of them, or Lightning's dict form")
    return out


def _local_epoch_steps(batches: int, trainer_kwargs: Mapping[str, Any] | None) -> int:
    """Steps of a local epoch of ``batches`` under the clients' Trainer options, as Lightning counts them."""
    limit, max_steps = (trainer_kwargs or {}).get("limit_train_batches"), (trainer_kwargs or {}).get("max_steps")
    if isinstance(limit, (int, float)):
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, limit)
    return min(batches, max_steps) if isinstance(max_steps, int) and max_steps >= 0 else batches


def _retain_head_features(node: _Node, start: Mapping[str, Tensor], head: str) -> tuple[Tensor, Tensor]:
    """The head's inputs and labels on the retain data for ``start``, kept in ``context.state`` for later rounds
    under a digest of the request and every array but the head's (calibration rounds change only head rows)."""
    digest = hashlib.sha256(node.config.get("request", "").encode())
    for name in sorted(set(start) - {f"{head}.weight", f"{head}.bias"}):
        digest.update(name.encode() + start[name].cpu().contiguous().numpy().tobytes())
    key = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
    cached = dict(node.state["head_features"].to_torch_state_dict()) if "head_features" in node.state else {}
    if "key" in cached and torch.equal(cached["key"], key):
        return cached["x"], cached["y"]
    set_arrays(node.model, start)
    x, y = head_features(node.model, linear_head(node.model, head), node.loader("retain"))
    node.state["head_features"] = ArrayRecord({"key": key, "x": x, "y": y})
    return x, y


def _calibration_update(node: _Node, start: dict[str, Tensor], cfg: Mapping[str, Any]) -> RecordDict:
    """A head-calibration round as the central ``calibrate_head`` fits: rows ``config["train_rows"]`` fitted by
    ``fit_rows`` on the retain head features for one local epoch with a fresh optimizer of the module's recipe."""
    t0, name, rows = time.perf_counter(), node.head, sorted({int(r) for r in cfg["train_rows"]})
    head = linear_head(node.model, name)
    x, y = _retain_head_features(node, start, name)
    set_arrays(node.model, start)
    keys = [f"{name}.weight", *([f"{name}.bias"] if head.bias is not None else [])]
    params = [start[k][rows].float().to(head.weight.device).requires_grad_(True) for k in keys]
    optimizer = optimizer_recipe(_module_optimizer(node.model, node.subset("retain")))(params)
    bs = node.part.batch_size
    steps = _local_epoch_steps(-(-len(x) // bs), node.trainer_kwargs)
    fit_start = time.perf_counter()
    fit_rows(head, rows, params[0], params[1] if head.bias is not None else None, x, y, optimizer, steps, bs,
             torch.Generator().manual_seed(int(cfg.get("seed", 0))))
    values = {k: p.detach().to(start[k].dtype).cpu().reshape(-1) for k, p in zip(keys, params)}  # rows in order
    metrics = {"local_compute_s": time.perf_counter() - fit_start, "fit_s": time.perf_counter() - t0}
    return up("masked_update", values, len(node.subset("retain")), metrics)


def _masked_update(node: _Node) -> RecordDict | None:
    """A masked round on the retain data from the deployed model with the broadcast values; ``"prune"`` mode (CDP)
    zeroes the selected channels and trains everything else."""
    mask = selected = node.mask()
    if node.split is not None and not len(node.split.retain):
        return None
    if node.config.get("mode", "train") == "prune":
        mask = ParameterMask({n: ~m for n, m in selected.masks.items()}, selected.channels)
    start = node.start(mask)
    if mask is not selected:
        start.update({n: start[n].masked_fill(m, 0) for n, m in selected.masks.items()})
    cfg, seed = node.config, int(node.config.get("seed", 0))
    if cfg.get("train_rows") is not None:  # head calibration: the values of ``mask`` arrive, only these rows train
        return _calibration_update(node, start, cfg)
    objective, bn_stats = cfg.get("objective", "retain"), cfg.get("bn_stats", "frozen")
    if objective in FORGET_AWARE and node.split is not None and len(node.split.forget):
        dm = UnlearningDataModule(node.part.dataset, node.part.dataset, node.request, node.part.batch_size, seed=seed,
                                  num_classes=node.part.num_classes, forget_indices=node.split.forget)
        callback: Callback = SelectiveUnlearning(mask=mask, log_metrics=False, objective=objective, seed=seed,
                                                 epochs=int(cfg.get("epochs", 1)), bn_stats=bn_stats,
                                                 forget_weight=float(cfg.get("forget_weight", 1.0)))
    else:
        dm, callback = SeededData(node.subset("retain"), node.part.batch_size, seed), GradientMask(mask, bn_stats)
    scales = head_parameter_scales(mask, node.layers, cfg.get("head_lr_scale")) or None
    arrays, metrics = _guarded_fit(node, start, dm, cfg, callback, scales)
    return up("masked_update", selected_values(arrays, mask), len(node.subset("retain")), metrics)


def _guarded_fit(node: _Node, start: Mapping[str, Tensor], dm: pl.LightningDataModule, cfg: Mapping[str, Any],
                 callback: Callback, scales: Mapping[str, float] | None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """A masked round's local fit from ``start`` that stops at its first non-finite loss (or ends with non-finite
    weights) with one line naming the client and what to change, instead of sending NaN values to the server."""
    client = node.part.client_id
    try:
        arrays, metrics = local_fit(node.model, start, dm, cfg, [DivergenceGuard(), *node.callbacks, callback],
                                    node.trainer_kwargs, scales)
    except DivergenceError as err:
        if err.first:  # before any update: not the learning rate
            raise DivergenceError(err.step, err.loss, f"client {client}: in its masked round {err}; check the "
                                  "client's data (non-finite inputs?) and the model") from None
        raise DivergenceError(err.step, err.loss, _diverged(node, cfg, str(err))) from None
    broken = [k for k, v in arrays.items() if not bool(torch.isfinite(v).all())]
    if broken:
        raise DivergenceError(-1, math.nan, _diverged(node, cfg, f"{short_repr(broken[0])} is non-finite after it"))
    return arrays, metrics


def _diverged(node: _Node, cfg: Mapping[str, Any], what: str) -> str:
    """The line for a diverged masked round: BatchNorm fixed in eval mode loses its invariance to the scale of the
    weights before it, so the rate the user's optimizer was tuned for can be far too large for the repair."""
    frozen_bn = cfg.get("bn_stats", "frozen") == "frozen" and any(isinstance(m, BN_TYPES)
                                                                  for m in node.model.modules())
    why = ("with every BatchNorm in eval mode (bn_stats='frozen') the module's learning rate can be too large for "
           "the repair: lower lr_scale or set bn_stats='selected'") if frozen_bn else \
        "lower lr_scale, or check the module's learning rate"
    return f"client {node.part.client_id}: the masked round's local fit diverged ({what}); {why}"


def _evaluate(node: _Node) -> RecordDict:
    """Local accuracy of the broadcast model (on forget and retain data when the message names a request). With
    ``config["base"] == "deployed"`` the message carries only the selected values (none: the deployed model itself)
    and the node rebuilds the model from the deployed one, as a masked round starts. ``config["max_samples"]``:
    each accuracy on a seeded subsample of at most that many (the same for every message with the same seed, so
    successive checks compare models on the same samples), still weighted by the data's full count."""
    if node.config.get("base") == "deployed":
        set_arrays(node.model, node.start(node.mask()) if node.arrays else node.deployed())
    else:
        set_arrays(node.model, node.arrays)
    metrics: dict[str, float | int] = {}
    limit, seed = node.config.get("max_samples"), int(node.config.get("seed", 0))
    for name in ("all",) if node.split is None else ("forget", "retain"):
        if len(data := node.subset(name)):
            count = len(data)
            if limit is not None and count > int(limit):
                picked = np.random.default_rng(seed).choice(count, int(limit), replace=False)
                data = Subset(data, np.sort(picked).tolist())
            loader = DataLoader(data, batch_size=256)
            metrics[f"{name}-acc"] = float(accuracy(node.model, loader, node.part.num_classes))
            metrics[f"{name}-examples"] = count
    return up("evaluation", {}, len(node.part.dataset), metrics)


def _hello(node: _Node) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"client-id": node.part.client_id, COUNT_KEY: len(node.part.dataset)})})


def _deploy(node: _Node) -> None:
    node.state["deployed"] = ArrayRecord(node.arrays)  # the global model later rounds start from


#: message type -> handler of the node's view of the message.
HANDLERS: dict[str, Callable[[_Node], RecordDict | None]] = {
    "train": _fit, "query.score": _score, "query.cdp": _cdp, "query.bn_stats": _bn_stats,
    "train.unlearn": _masked_update, "query.head_features": _head_features, "evaluate": _evaluate,
    "query.hello": _hello, "query.deploy": _deploy,
}


def make_client_app(model_fn: Callable[[], pl.LightningModule] | Callable[[Context], pl.LightningModule],
                    partition_fn: Callable[[Context], ClientPartition] | None = None,
                    callbacks_fn: Callable[[], Sequence[Callback]] | None = None,
                    trainer_kwargs: Mapping[str, Any] | None = None,
                    mods: Sequence[Callable] | None = None) -> ClientApp:
    """The protocol's ClientApp (:data:`HANDLERS`) on the node's partition (default: a deployed node's shard file,
    :func:`file_partition`). ``model_fn`` may take the node's ``Context``; the functions must pickle for Flower's
    workers. ``mods``: Flower client mods."""
    partition_fn = partition_fn or file_partition
    app = ClientApp(mods=list(mods or []))
    required = [p for p in inspect.signature(model_fn).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_context = len(required) == 1

    def handle(message: Message, context: Context) -> Message:
        model = model_fn(context) if takes_context else model_fn()
        callbacks = list(callbacks_fn()) if callbacks_fn is not None else []
        node = _Node(partition_fn(context), model, context, message.content, callbacks, trainer_kwargs)
        reply = HANDLERS[message.metadata.message_type](node)
        return Message(reply if reply is not None else up(None), reply_to=message)

    for kind in HANDLERS:
        category, _, action = kind.partition(".")
        getattr(app, category)(*([action] if action else []))(handle)
    return app
