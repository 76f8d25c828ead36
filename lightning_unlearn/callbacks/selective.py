"""SelectiveUnlearning: explain, select channels, reset them, repair only them. One callback on an existing Trainer."""
from __future__ import annotations

import time
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_unlearn.attribution import ChannelScores, channel_scores, discover_layers
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.callbacks.learning_rate import ScaleLearningRate
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.mixin import UnlearningMixin
from lightning_unlearn.objectives import FORGET_AWARE
from lightning_unlearn.reset import reestimate_batchnorm, reset_selected
from lightning_unlearn.selection import ParameterMask, head_parameter_scales, select_channels
from lightning_unlearn.stopping import CheckSets, StoppingRule


class SelectiveUnlearning(GradientMask):
    """Make a model forget the data of ``trainer.datamodule`` (an :class:`UnlearningDataModule`).

    Remove, then repair. At fit start: score channels on ``datamodule.forget_dataloader()``
    (scores all-reduced across DDP ranks), select the top channels, reset them (``config.reset``;
    their BatchNorm statistics re-estimated on retain data) and install an exact
    :class:`GradientMask`, so the fit repairs only the selected slices. With a forget-aware
    objective the module must subclass :class:`UnlearningMixin`; the callback then routes
    combined retain/forget batches to it. Like ``EarlyStopping``, the callback owns its budget,
    whatever the Trainer's ``max_epochs``: it stops at the step budget (``config.max_steps``,
    ``"auto"``: :func:`~lightning_unlearn.config.auto_max_steps`), after ``config.epochs`` if set,
    and, with ``config.early_stopping``, as soon as the :class:`~lightning_unlearn.stopping.StoppingRule`
    sees the forget data forgotten and remaining accuracy recovered on held-out data. Every check
    is in :attr:`stopping_history`; :attr:`stop_reason` says why the fit ended.

    Args:
        config: an :class:`~lightning_unlearn.UnlearnConfig` (default: its defaults); keyword
            ``overrides`` replace single fields, e.g. ``SelectiveUnlearning(ratio=0.2)``.
        log_metrics: log forget / remaining / test accuracy (torchmetrics) at the end of every epoch.
        progress: show a progress bar while scoring.
        mask: a precomputed :class:`ParameterMask` or a path to one (e.g. broadcast by a federated
            server): no scoring happens, only the masked update with ``config.objective``.
    """

    def __init__(
        self,
        config: UnlearnConfig | None = None,
        log_metrics: bool = True,
        progress: bool = False,
        mask: ParameterMask | str | os.PathLike | None = None,
        **overrides: Any,
    ) -> None:
        self.config = UnlearnConfig.build(config, **overrides)
        super().__init__(mask=mask, bn_stats=self.config.bn_stats)
        self.log_metrics, self.progress = log_metrics, progress
        self.scores: ChannelScores | None = None
        self.timings: dict[str, float] = {}
        self.history: list[dict[str, float | None]] = []
        self._user_step = None
        self._resolved: UnlearnConfig | None = None
        self._resumed = False
        self._lr: ScaleLearningRate | None = None
        self._rule: StoppingRule | None = None
        self._checks: CheckSets | None = None
        self._reference: float | None = None
        self._budget: int | None = None
        self._interval = 0
        self._last_step: int | None = None
        self.stop_reason: str | None = None
        self.steps = 0

    @property
    def stopping_history(self) -> list[dict]:
        """Every check of the stopping rule: step, forget accuracy and target, remaining accuracy, decision."""
        return self._rule.rows() if self._rule is not None else []

    @property
    def resolved_config(self) -> UnlearnConfig:
        """The config with ``"auto"`` values resolved for the data module's request (after ``setup``)."""
        if self._resolved is None:
            raise RuntimeError("the config is resolved in setup(): call trainer.fit first")
        return self._resolved

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
        cfg = self._resolved = self.config.resolved(dm.request, "central")
        forget_aware = cfg.objective in FORGET_AWARE
        if forget_aware and not isinstance(pl_module, UnlearningMixin):
            raise TypeError(
                f"objective {cfg.objective!r} needs the model to subclass lightning_unlearn.UnlearningMixin "
                f"({type(pl_module).__name__} does not); add the mixin or use objective='retain'"
            )
        dm.combined = forget_aware
        if forget_aware:
            pl_module.configure_unlearning(cfg.objective, dm.request.classes, cfg.forget_weight, cfg.seed)
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
        cfg = self.resolved_config
        self.stop_reason, self._last_step = None, None
        if self.mask is None:  # neither given nor restored from a checkpoint
            start = time.perf_counter()
            self.scores = self._score(trainer, pl_module)
            self.timings["scoring"] = time.perf_counter() - start
            self.mask = select_channels(
                self.scores, pl_module, cfg.ratio, cfg.scope, cfg.threshold, cfg.include_head, cfg.head_rows
            )
            rank_zero_info(f"SelectiveUnlearning: {cfg.method} selected {self.mask.fraction:.2%} of parameters")
        self._prepare_stopping(trainer, pl_module)
        if not self._resumed:  # a resumed run's weights were reset before its checkpoint was written
            self._reset(trainer, pl_module)
        self._check_same_mask_on_all_ranks(trainer)
        self._fit_start = time.perf_counter()
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg = self.resolved_config
        head = cfg.head_lr_scale if cfg.head_lr_scale is not None else cfg.lr_scale
        params = {}
        if head != cfg.lr_scale:
            layers = self.scores.layers if self.scores is not None else layer_info(pl_module, trainer.datamodule)
            params = head_parameter_scales(self.mask, layers, head)
        self._lr = ScaleLearningRate(cfg.lr_scale, params)
        if not self._lr.is_identity:
            self._lr.on_train_start(trainer, pl_module)

    # -- the budget and the stopping rule -------------------------------------------------------
    def _prepare_stopping(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step budget, check sets and the original's remaining accuracy (measured before the reset)."""
        cfg = self.resolved_config
        dm = trainer.datamodule
        self._budget = cfg.step_budget(len(dm.retain_dataloader()))
        self._interval = cfg.check_interval(self._budget)
        if not cfg.early_stopping:
            return
        self._checks = CheckSets(dm, cfg.check_samples, cfg.seed)
        if self._reference is None:  # a resumed run keeps the reference of its first start
            self._reference = self._checks.evaluate(pl_module)[2]
        self._rule = StoppingRule(self._reference, cfg.stop_tolerance, cfg.patience)
        rank_zero_info(f"SelectiveUnlearning: budget {self._budget} steps, checks every {self._interval}; original "
                       f"remaining accuracy on held-out data {self._reference:.2%}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        reason = None
        if self._rule is not None and step % self._interval == 0:
            forget_acc, target, remaining_acc = self._checks.evaluate(pl_module)
            reason = self._rule.update(step, forget_acc, target, remaining_acc)
            self._pause_forget_term_once_forgotten(pl_module, self._rule.history[-1].forgotten)
            pl_module.log_dict({"unlearn/check_forget_acc": forget_acc, "unlearn/check_remaining_acc": remaining_acc})
            if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
                reason = reason or "another rank's check"  # every rank checks at the same steps
        if reason is None and self._budget is not None and step >= self._budget:
            reason = "step budget"
        if reason is not None:
            self._stop(trainer, reason)

    def _pause_forget_term_once_forgotten(self, pl_module: pl.LightningModule, forgotten: bool) -> None:
        """A forget-aware term is the means to forget, not the repair: once held-out data shows the forget data
        forgotten it is paused (weight 0) so it stops pulling shared features away from the retain data; a
        later check that shows the data back resumes it."""
        cfg = self.resolved_config
        if cfg.objective in FORGET_AWARE and isinstance(pl_module, UnlearningMixin):
            pl_module.forget_weight = 0.0 if forgotten else cfg.forget_weight

    def _stop(self, trainer: pl.Trainer, reason: str) -> None:
        trainer.should_stop = True
        self.stop_reason = reason
        last = self._rule.history[-1] if self._rule is not None and self._rule.history else None
        if last is None:
            rank_zero_info(f"SelectiveUnlearning: stopped at step {trainer.global_step} ({reason})")
            return
        summary = (f"forget accuracy {last.forget_acc:.2%} (target {last.forget_target:.2%}), remaining accuracy "
                   f"{last.remaining_acc:.2%} (original {last.remaining_reference:.2%})")
        rank_zero_info(f"SelectiveUnlearning: stopped at step {trainer.global_step} ({reason}): {summary}")
        if not (last.forgotten and last.recovered):
            rank_zero_warn(f"SelectiveUnlearning stopped ({reason}) before forgetting and repair both held: {summary}; "
                           "raise max_steps or stop_tolerance, or check the learning rate")
        if last.over_forgotten:
            rank_zero_warn(f"SelectiveUnlearning over-forgot: {summary}; a retrained model would score about the "
                           "target on these samples (use objective='retain' for sample requests)")

    def _reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``config.reset``: remove the selected slices (same seed on every rank), re-estimate their BatchNorm stats."""
        cfg = self.resolved_config
        if cfg.reset == "none":
            return
        start = time.perf_counter()
        changed = reset_selected(pl_module, self.mask, cfg.reset, cfg.seed)
        batches = reestimate_batchnorm(pl_module, self.mask, trainer.datamodule.retain_dataloader(shuffle=False))
        self.timings["reset"] = time.perf_counter() - start
        rank_zero_info(f"SelectiveUnlearning: reset ({cfg.reset}) {changed} elements; BatchNorm statistics of the "
                       f"selected channels re-estimated on {batches} retain batches")

    def _score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ChannelScores:
        """Each rank scores its shard of the forget set; sums and counts are all-reduced."""
        dm = trainer.datamodule
        forget, retain = dm.forget_dataloader(), dm.retain_dataloader() if self.config.contrast else None
        world, rank = trainer.world_size, trainer.global_rank
        if world > 1:
            forget = _shard(forget, rank, world)
            retain = _shard(retain, rank, world) if retain is not None else None
        cfg = self.resolved_config
        scores = channel_scores(
            pl_module, forget, cfg.method, cfg.layers, retain, cfg.max_samples, cfg.seed, progress=self.progress
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
        epochs = self.resolved_config.epochs
        if epochs is not None and trainer.current_epoch + 1 >= epochs and not trainer.should_stop:
            self._stop(trainer, "epochs")
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
        self.steps = trainer.global_step
        if self.stop_reason is None:
            self.stop_reason = "trainer"  # the Trainer's own max_epochs / max_steps ended the fit first

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scores"] = None if self.scores is None else self.scores.state_dict()
        state["config"] = self.config.to_dict()
        state["stopping_reference"] = self._reference
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        had_mask = self.mask is not None
        super().load_state_dict(state_dict)
        self._resumed = state_dict.get("mask") is not None
        if state_dict.get("scores") is not None:
            self.scores = ChannelScores.from_state_dict(state_dict["scores"])
        if state_dict.get("stopping_reference") is not None:
            self._reference = float(state_dict["stopping_reference"])
        saved = state_dict.get("config") or {}
        selection = ("method", "ratio", "scope", "threshold", "contrast", "max_samples", "layers", "include_head",
                     "head_rows")
        changed = [k for k in selection if k in saved and saved[k] != getattr(self.config, k)]
        if state_dict.get("mask") is not None and (changed or had_mask):
            rank_zero_warn(f"SelectiveUnlearning resumes with the checkpoint's mask ({self.mask.sha256()[:12]}); "
                           f"this callback's {', '.join(changed) or 'mask'} setting does not apply to it")


def layer_info(model: pl.LightningModule, datamodule: Any) -> dict:
    """Scorable layers of ``model``, traced on one training sample of ``datamodule``."""
    x = datamodule.train_dataset[0][0][None]
    return discover_layers(model, x.to(next(model.parameters()).device))


def _shard(loader: DataLoader, rank: int, world: int) -> DataLoader:
    indices = list(range(rank, len(loader.dataset), world))
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size or 64, shuffle=False)
