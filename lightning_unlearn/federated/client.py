"""Client side: local Lightning training, local scoring and masked updates on the client's own data.

The work is done by plain functions of (model, arrays, data, config) -> (arrays, metrics)
(:func:`local_fit`, :func:`local_scores`, :func:`cdp_activations`), so a Flower
``ClientApp`` can call the same code. :class:`FederatedClient` binds them to one client's
shard and answers :class:`~lightning_unlearn.federated.messages.Broadcast` messages with
upward messages; nothing else leaves it.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn._training import fit, quiet_lightning
from lightning_unlearn.scoring import channel_scores, discover_layers
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.callbacks.learning_rate import ScaleLearningRate
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays, write_values
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.data.federated import ClientSplit, FederatedDataModule
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.federated.messages import (
    BatchNormStatsMessage,
    Broadcast,
    MaskedUpdateMessage,
    ParametersMessage,
    ScoresMessage,
    short_repr,
)
from lightning_unlearn.federated.server import statistic_masks
from lightning_unlearn.repair.objectives import FORGET_AWARE
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.mask import ParameterMask, head_parameter_scales


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


# -- one simulated client -----------------------------------------------------------------------------
class FederatedClient:
    """A client: its shard, its forget split, the deployed global model, and the handlers the server calls.

    Every handler takes a :class:`Broadcast` and returns one upward message (or ``None``: nothing to send).
    """

    def __init__(
        self,
        client_id: int,
        dataset: Dataset,
        model: pl.LightningModule,
        batch_size: int = 64,
        num_classes: int = 10,
        callbacks: Sequence[Callback] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.client_id, self.dataset, self.model = client_id, dataset, model
        self.batch_size, self.num_classes = batch_size, num_classes
        self.callbacks, self.trainer_kwargs = list(callbacks), dict(trainer_kwargs or {})
        self.request: ForgetRequest | None = None
        self.split: ClientSplit | None = None
        self.deployed: dict[str, Tensor] | None = None
        self._mask: ParameterMask | None = None
        self._pruned: ParameterMask | None = None
        self._layers = None

    # -- simulation set-up (client-local knowledge) --------------------------------------------------
    def receive_request(self, request: ForgetRequest, split: ClientSplit) -> None:
        """The deletion request as this client sees it: which of its own samples go."""
        self.request, self.split, self._mask, self._pruned = request, split, None, None

    def _subset(self, which: str) -> Dataset:
        if self.split is None or which == "all":
            return self.dataset
        return Subset(self.dataset, getattr(self.split, which).tolist())

    def _loader(self, dataset: Dataset, shuffle: bool = False, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=gen)

    # -- handlers --------------------------------------------------------------------------------------
    def fit(self, message: Broadcast) -> ParametersMessage | None:
        """FedAvg local training (``config["data"]``: ``"all"`` or ``"retain"``)."""
        data = self._subset(message.config.get("data", "all"))
        if len(data) == 0:
            return None
        dm = _LoaderModule(data, self.batch_size, int(message.config.get("seed", 0)))
        arrays, metrics = local_fit(self.model, message.arrays, dm, message.config, self.callbacks, self.trainer_kwargs)
        return ParametersMessage(arrays, len(data), metrics)

    def deploy(self, message: Broadcast) -> None:
        """Keep the final global model: the reference every masked round starts from."""
        self.deployed = {k: v.clone() for k, v in message.arrays.items()}

    def score(self, message: Broadcast) -> ScoresMessage | None:
        """Explain the deployed model on local forget data (nothing to send without forget data)."""
        if self.split is None or not len(self.split.forget):
            return None
        set_arrays(self.model, self._require_deployed())
        retain = None
        if message.config.get("contrast") and len(self.split.retain):
            retain = self._loader(self._subset("retain"))
        return local_scores(self.model, self._loader(self._subset("forget")), message.config, retain)

    def cdp_stats(self, message: Broadcast) -> list[ScoresMessage] | None:
        """CDP: per-channel mean activations per local document (the forget set, each retained class)."""
        set_arrays(self.model, self._require_deployed())
        layers = self._layer_info()
        layers = {n: i for n, i in layers.items() if not i.is_head}
        meta = {n: (i.out_channels, i.batchnorm, i.is_head) for n, i in layers.items()}
        max_samples = message.config.get("max_samples")
        out = []
        if self.split is not None and len(self.split.forget):
            acts, n = cdp_activations(self.model, self._loader(self._subset("forget")), layers, max_samples)
            out.append(ScoresMessage(acts, n, "cdp_activation", meta, tag="forget"))
        retain = self._subset("retain") if self.split is not None else self.dataset
        if len(retain):
            targets = dataset_targets(retain).numpy()
            for c in np.unique(targets):
                sub = Subset(retain, np.flatnonzero(targets == c).tolist())
                acts, n = cdp_activations(self.model, self._loader(sub), layers, max_samples)
                out.append(ScoresMessage(acts, n, "cdp_activation", meta, tag=f"class_{int(c)}"))
        return out or None

    def bn_statistics(self, message: Broadcast) -> BatchNormStatsMessage | None:
        """After a reset: the input moments of the selected BatchNorm channels on local retain data.

        The broadcast carries the mask and the reset selected values; the client forwards at most
        ``config["max_batches"]`` shuffled (``config["seed"]``) retain batches (:func:`batchnorm_moments`).
        """
        reference = self._require_deployed()
        if message.channels is not None:
            self._mask = self._build_mask(message.channels, "train")
        if self._mask is None:
            raise RuntimeError(f"client {self.client_id}: the statistics round needs the channel mask")
        if self.split is not None and not len(self.split.retain):
            return None
        set_arrays(self.model, self._start(reference, message.arrays))
        cfg = message.config
        loader = self._loader(self._subset("retain"), shuffle=True, seed=int(cfg.get("seed", 0)))
        t0 = time.perf_counter()
        moments, n = batchnorm_moments(self.model, self._mask, loader, int(cfg.get("max_batches", 20)))
        return BatchNormStatsMessage(moments, n, {"local_compute_s": time.perf_counter() - t0})

    def masked_update(self, message: Broadcast) -> MaskedUpdateMessage | None:
        """A masked local round: start from the deployed model with the broadcast selected values.

        ``config["mode"]``: ``"train"`` updates the selected channels; ``"prune"`` (CDP) zeroes them
        and updates everything else. Clients without retain data send nothing.
        """
        reference = self._require_deployed()
        cfg = message.config
        if message.channels is not None:
            self._mask = self._build_mask(message.channels, cfg.get("mode", "train"))
        if self._mask is None:
            raise RuntimeError(f"client {self.client_id}: a masked round needs the channel mask (sent with round 0)")
        if self.split is not None and not len(self.split.retain):
            return None
        start = self._start(reference, message.arrays)
        if self._pruned is not None:
            start = self._zero_pruned(start)
        objective = cfg.get("objective", "retain")
        has_forget = self.split is not None and len(self.split.forget) > 0
        seed = int(cfg.get("seed", 0))
        if objective in FORGET_AWARE and has_forget:
            dm = UnlearningDataModule(self.dataset, self.dataset, self.request, self.batch_size, seed=seed,
                                      num_classes=self.num_classes, forget_indices=self.split.forget)
            callback: Callback = SelectiveUnlearning(mask=self._mask, log_metrics=False, objective=objective, seed=seed,
                                                     epochs=int(cfg.get("epochs", 1)),
                                                     forget_weight=float(cfg.get("forget_weight", 1.0)),
                                                     bn_stats=cfg.get("bn_stats", "frozen"))
        else:
            dm = _LoaderModule(self._subset("retain"), self.batch_size, seed)
            callback = GradientMask(self._mask, bn_stats=cfg.get("bn_stats", "frozen"))
        arrays, metrics = local_fit(self.model, start, dm, cfg, [*self.callbacks, callback], self.trainer_kwargs,
                                    self._head_lr_scale(cfg))
        n = len(self.split.retain) if self.split is not None else len(self.dataset)
        return MaskedUpdateMessage(selected_values(arrays, self._mask), n, metrics)

    # -- helpers -----------------------------------------------------------------------------------------
    def _require_deployed(self) -> dict[str, Tensor]:
        if self.deployed is None:
            raise RuntimeError(f"client {self.client_id} holds no global model yet: run FedAvg (or deploy) first")
        return self.deployed

    def _start(self, reference: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The deployed arrays with the broadcast selected values written in: parameter slices, and (after a
        reset) the running statistics of the selected BatchNorm channels. Any other key is refused."""
        statistics = statistic_masks(selected_batchnorm_channels(self.model, self._mask)) if values else {}
        params = {k: v for k, v in values.items() if k in self._mask.masks and bool(self._mask.masks[k].any())}
        start = write_values(reference, self._mask, params)
        for key, v in values.items():
            if key in params:
                continue
            if key not in statistics or v.numel() != int(statistics[key].sum()):
                raise ValueError(f"client {self.client_id}: broadcast value {short_repr(key)} ({v.numel()} values) is "
                                 "neither a selected parameter slice nor a selected BatchNorm statistic")
            start[key][statistics[key]] = v.to(start[key].dtype)
        return start

    def _layer_info(self):
        if self._layers is None:
            example = self.dataset[0][0].unsqueeze(0).repeat(2, *([1] * self.dataset[0][0].dim()))
            self._layers = discover_layers(self.model, example)
        return self._layers

    def _head_lr_scale(self, cfg: Mapping[str, Any]) -> dict[str, float] | None:
        """``{head parameter: factor}`` for ``config["head_lr_scale"]`` when the mask selects head rows."""
        if self._mask is None:
            return None
        return head_parameter_scales(self._mask, self._layer_info(), cfg.get("head_lr_scale")) or None

    def _build_mask(self, channels: Mapping[str, Sequence[int]], mode: str) -> ParameterMask:
        selected = ParameterMask.from_channels(self.model, channels, self._layer_info())
        self._pruned = None
        if mode == "prune":
            self._pruned = selected
            return ParameterMask({n: ~m for n, m in selected.masks.items()}, channels)
        return selected

    def _zero_pruned(self, arrays: dict[str, Tensor]) -> dict[str, Tensor]:
        for n, m in self._pruned.masks.items():
            if bool(m.any()):
                arrays[n] = torch.where(m, torch.zeros_like(arrays[n]), arrays[n])
        return arrays


def make_clients(
    fdm: FederatedDataModule,
    model: pl.LightningModule,
    callbacks: Sequence[Callback] = (),
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> list[FederatedClient]:
    """One :class:`FederatedClient` per shard. They share one working copy of ``model`` (clients run one at a time)."""
    fdm.setup("fit")
    work = copy.deepcopy(model)
    return [
        FederatedClient(k, fdm.client_dataset(k), work, fdm.batch_size, fdm.num_classes, callbacks, trainer_kwargs)
        for k in range(fdm.num_clients)
    ]
