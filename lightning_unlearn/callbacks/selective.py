"""SelectiveUnlearning: explain, select channels, fine-tune only them. One callback on an existing Trainer."""
from __future__ import annotations

import time
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_unlearn.attribution import METHODS, ChannelScores, channel_scores
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.mixin import UnlearningMixin
from lightning_unlearn.objectives import FORGET_AWARE, check_objective
from lightning_unlearn.selection import SCOPES, ParameterMask, select_channels


class SelectiveUnlearning(GradientMask):
    """Make a model forget the data of ``trainer.datamodule`` (an :class:`UnlearningDataModule`).

    At fit start: score channels on ``datamodule.forget_dataloader()`` (scores all-reduced
    across DDP ranks), select the top channels, install an exact :class:`GradientMask`.
    With a forget-aware objective the module must subclass :class:`UnlearningMixin`; the
    callback then routes combined retain/forget batches to it.

    Args:
        method: channel scoring method (see :func:`lightning_unlearn.channel_scores`).
        ratio: fraction of channels to select, in (0, 1].
        objective: ``"random_label"`` (default), ``"ascent"`` or ``"retain"``.
        scope: ``"layer"`` (top-k per layer) or ``"global"``.
        threshold: select by normalised score instead of ``ratio``.
        layers: layer names to score and update (default: every Conv/Linear layer).
        include_head: let the classifier head's rows be selected by score.
        head_rows: head rows always trainable; ``"auto"`` = the forgotten classes for class requests.
        contrast: score forget relative to retain data.
        max_samples: seeded subsample of the forget set to score (None: method default).
        forget_weight: weight of the forget term in forget-aware objectives.
        log_metrics: log forget / remaining / test accuracy (torchmetrics) at the end of every epoch.
        mask: a precomputed :class:`ParameterMask` (e.g. broadcast by a federated server): no
            scoring happens, only the masked update with ``objective``.
    """

    def __init__(
        self,
        method: str = "grad_x_act",
        ratio: float = 0.1,
        objective: str = "random_label",
        scope: str = "layer",
        threshold: float | None = None,
        layers: Sequence[str] | None = None,
        include_head: bool = False,
        head_rows: Sequence[int] | str | None = "auto",
        contrast: bool = False,
        max_samples: int | None = None,
        seed: int = 0,
        bn_stats: str = "frozen",
        forget_weight: float = 1.0,
        log_metrics: bool = True,
        progress: bool = False,
        mask: ParameterMask | str | None = None,
    ) -> None:
        super().__init__(mask=mask, bn_stats=bn_stats)
        if method not in METHODS:
            raise ValueError(f"unknown scoring method {method!r}; allowed methods are {list(METHODS)}")
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; allowed scopes are {list(SCOPES)}")
        self.method, self.ratio, self.objective = method, ratio, check_objective(objective)
        self.scope, self.threshold, self.layers, self.include_head = scope, threshold, layers, include_head
        self.head_rows, self.contrast, self.max_samples, self.seed = head_rows, contrast, max_samples, seed
        self.forget_weight, self.log_metrics, self.progress = forget_weight, log_metrics, progress
        self.scores: ChannelScores | None = None
        self.timings: dict[str, float] = {}
        self.history: list[dict[str, float | None]] = []
        self._user_step = None

    # -- set-up: data mode and objective routing ---------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "forget_dataloader"):
            raise ValueError(
                "SelectiveUnlearning needs trainer.fit(model, datamodule=UnlearningDataModule(...)); "
                f"got datamodule {type(dm).__name__ if dm is not None else None}"
            )
        forget_aware = self.objective in FORGET_AWARE
        if forget_aware and not isinstance(pl_module, UnlearningMixin):
            raise TypeError(
                f"objective {self.objective!r} needs the model to subclass lightning_unlearn.UnlearningMixin "
                f"({type(pl_module).__name__} does not); add the mixin or use objective='retain'"
            )
        dm.combined = forget_aware
        if forget_aware:
            classes = dm.request.classes
            pl_module.configure_unlearning(self.objective, classes, self.forget_weight, self.seed)
            self._route_combined_batches(pl_module)

    def _route_combined_batches(self, pl_module: pl.LightningModule) -> None:
        """Instance-level wrapper: works whatever the mixin's position in the bases (MRO)."""
        user_step = pl_module.training_step

        def training_step(batch, batch_idx=0, *args, **kwargs):
            if isinstance(batch, dict) and "forget" in batch:
                return pl_module.unlearning_step(batch, batch_idx, user_step)
            return user_step(batch, batch_idx, *args, **kwargs)

        self._user_step = user_step
        pl_module.training_step = training_step

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._user_step is not None and "training_step" in vars(pl_module):
            del pl_module.training_step
            self._user_step = None
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "combined"):
            trainer.datamodule.combined = False

    # -- scoring and selection ---------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mask is None:  # neither given nor restored from a checkpoint
            start = time.perf_counter()
            self.scores = self._score(trainer, pl_module)
            self.timings["scoring"] = time.perf_counter() - start
            dm = trainer.datamodule
            rows = list(dm.request.classes) if self.head_rows == "auto" else (self.head_rows or None)
            self.mask = select_channels(
                self.scores, pl_module, self.ratio, self.scope, self.threshold, self.include_head, rows
            )
            rank_zero_info(f"SelectiveUnlearning: {self.method} selected {self.mask.fraction:.2%} of parameters")
        self._check_same_mask_on_all_ranks(trainer)
        self._fit_start = time.perf_counter()
        super().on_fit_start(trainer, pl_module)

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ChannelScores:
        """Each rank scores its shard of the forget set; sums and counts are all-reduced."""
        dm = trainer.datamodule
        forget, retain = dm.forget_dataloader(), dm.retain_dataloader() if self.contrast else None
        world, rank = trainer.world_size, trainer.global_rank
        if world > 1:
            forget = _shard(forget, rank, world)
            retain = _shard(retain, rank, world) if retain is not None else None
        scores = channel_scores(
            pl_module, forget, self.method, self.layers, retain, self.max_samples, self.seed, progress=self.progress
        )
        if world > 1:
            count = trainer.strategy.reduce(torch.tensor(float(scores.num_samples), device=pl_module.device), reduce_op="sum")
            summed = {
                n: trainer.strategy.reduce(s.to(pl_module.device) * scores.num_samples, reduce_op="sum") / count
                for n, s in scores.items()
            }
            scores = ChannelScores({n: s.cpu() for n, s in summed.items()}, int(count), scores.method, scores.layers)
        return scores

    def _check_same_mask_on_all_ranks(self, trainer: pl.Trainer) -> None:
        if trainer.world_size <= 1:
            return
        mine = self.mask.sha256()
        reference = trainer.strategy.broadcast(mine, src=0)
        if mine != reference:
            raise RuntimeError(
                f"rank {trainer.global_rank} selected a different mask ({mine[:12]}) than rank 0 ({reference[:12]}); "
                "refusing to unlearn with inconsistent masks"
            )

    # -- metrics -----------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_metrics:
            return
        dm = trainer.datamodule
        row = {
            "epoch": trainer.current_epoch,
            "forget_acc": accuracy(pl_module, dm.forget_test_dataloader() or dm.forget_dataloader(), dm.num_classes),
            "remaining_acc": accuracy(pl_module, dm.remaining_test_dataloader(), dm.num_classes),
            "test_acc": accuracy(pl_module, dm.full_test_dataloader(), dm.num_classes),
        }
        self.history.append(row)
        values = {f"unlearn/{k}": float(v) for k, v in row.items() if k != "epoch" and v is not None}
        pl_module.log_dict(values, sync_dist=trainer.world_size > 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.timings["unlearning"] = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scores"] = None if self.scores is None else self.scores.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("scores") is not None:
            self.scores = ChannelScores.from_state_dict(state_dict["scores"])


def _shard(loader: DataLoader, rank: int, world: int) -> DataLoader:
    indices = list(range(rank, len(loader.dataset), world))
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size or 64, shuffle=False)
