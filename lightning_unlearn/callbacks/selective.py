"""SelectiveUnlearning: explain, select channels, reset them, repair only them. One callback on an existing Trainer."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_unlearn.config import FORGET_AWARE, TARGETED, UnlearnConfig
from lightning_unlearn.mask import MaskEnforcer, ParameterMask
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.orchestration import (
    RepairPlan,
    ResetOutcome,
    apply_reset,
    exclude_frozen,
    plan_repair,
    prepare,
)
from lightning_unlearn.repair import (
    CheckSets,
    LearningRateGroups,
    StoppingRule,
    StopReason,
    UnlearningMixin,
    calibrate_head,
    check_finite,
    heldout_targets,
    memorisation_gap,
    optimizer_recipe,
)
from lightning_unlearn.repair.calibration import linear_head, require_rows_in_mask
from lightning_unlearn.scoring import channel_scores
from lightning_unlearn.scoring.channels import ChannelScores, average_scores
from lightning_unlearn.scoring.layers import layer_info

#: Samples of the retain and of the test set that measure the memorisation gap of ``objective="heldout"``.
GAP_SAMPLES = 512

#: Settings that decide the mask: a resumed run keeps the checkpoint's mask whatever these say now.
SELECTION_SETTINGS = ("method", "ratio", "scope", "threshold", "contrast", "max_samples", "layers", "include_head",
                      "head_rows")


class SelectiveUnlearning(Callback):
    """Make a model forget the data of ``trainer.datamodule`` (an :class:`UnlearningDataModule`).

    Remove, then repair. At fit start: :meth:`score` channels on ``datamodule.forget_dataloader()``
    (count-weighted across DDP ranks), :meth:`select` the top channels, :meth:`reset` them
    (``config.reset``; their BatchNorm statistics re-estimated on retain data), and enforce the mask
    exactly with a :class:`~lightning_unlearn.mask.MaskEnforcer`, so the fit repairs only the selected
    slices. Subclass and override :meth:`score`, :meth:`select` or :meth:`reset` to change a step.
    With a forget-aware objective the module must subclass :class:`UnlearningMixin`, which dispatches
    the combined retain/forget batches the data module then yields. Like ``EarlyStopping``, the callback
    owns its budget, whatever the Trainer's ``max_epochs``: it stops at the step budget
    (``config.max_steps``, ``"auto"``: :func:`~lightning_unlearn.config.auto_max_steps`), after
    ``config.epochs`` if set, and, with ``config.early_stopping``, as soon as the
    :class:`~lightning_unlearn.repair.StoppingRule` sees the forget data forgotten and remaining accuracy
    recovered on held-out data. A Trainer without ``max_steps`` gets the budget as its ``max_steps`` in
    :meth:`setup`, so ``trainer.estimated_stepping_batches`` (e.g. a ``OneCycleLR`` sized in
    ``configure_optimizers``) counts the repair's steps. With ``config.calibrate="head"`` the forgotten
    classes' head rows are refit on retain features when the repair ends (:meth:`calibrate`). Every check is
    in :attr:`stopping_history`; :attr:`stop_reason` (a :class:`~lightning_unlearn.repair.StopReason`) says
    why the fit ended. A non-finite loss, parameter or BatchNorm statistic ends the fit with a
    :class:`~lightning_unlearn.repair.NonFiniteError`.

    Each fit is one request: the mask, scores and stopping state of a previous fit are dropped at
    setup, unless a checkpoint of the same request restores them (``trainer.fit(..., ckpt_path=...)``);
    a resumed run continues with the checkpoint's mask, learning-rate groups and stopping state.

    Args:
        config: an :class:`~lightning_unlearn.UnlearnConfig` (default: its defaults); keyword
            ``overrides`` replace single fields, e.g. ``SelectiveUnlearning(ratio=0.2)``.
        log_metrics: log forget / remaining / test accuracy (torchmetrics) at the end of every epoch.
        progress: show a progress bar while scoring.
        mask: a precomputed :class:`ParameterMask` or a path to one (e.g. broadcast by a federated
            server): no scoring happens, only the reset and the masked update.
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
        if mask is not None and not isinstance(mask, (ParameterMask, str, os.PathLike)):
            raise ValueError(f"mask must be a ParameterMask or a path to a saved mask, got {type(mask).__name__}")
        self.log_metrics, self.progress = log_metrics, progress
        self._given_mask = ParameterMask.load(mask) if isinstance(mask, (str, os.PathLike)) else mask
        self._filled_max_steps = self._filled_max_epochs = False
        self._start_request()

    def _start_request(self) -> None:
        """Per-request state: what one fit computes, saves and restores."""
        self.mask: ParameterMask | None = self._given_mask
        self.scores: ChannelScores | None = None
        self.timings: dict[str, float] = {}
        self.history: list[dict[str, float | None]] = []
        self.stop_reason: StopReason | None = None
        self.steps = 0
        self._budget: int | None = None
        self._request: dict | None = None
        self._resolved: UnlearnConfig | None = None
        self._restored = False
        self._plan: RepairPlan | None = None
        self._learning_rates: LearningRateGroups | None = None
        self._enforcer: MaskEnforcer | None = None
        self._checks: CheckSets | None = None
        self._rule: StoppingRule | None = None
        self._rule_state: dict | None = None
        self._reference: float | None = None
        self._forget_state: dict | None = None
        self._last_step = 0
        self._fit_start = 0.0
        self._head: str | None = None
        self._optimizer_factory = None
        self._calibrated = False
        self._uncalibrated_head: dict[str, torch.Tensor] | None = None
        #: ``objective="heldout"``: each forget sample's held-out target (forget-set order), computed from the
        #: original at fit start; the data module's forget batches carry it.
        self.forget_targets: torch.Tensor | None = None

    # -- public state ------------------------------------------------------------------------
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

    @property
    def step_budget(self) -> int | None:
        """The repair's cap on optimizer steps (``config.max_steps``, ``"auto"`` sized by the retain data; None:
        ``config.epochs`` decide), known from ``setup``, before ``configure_optimizers`` runs."""
        return self._budget

    @property
    def needs_forget_batches(self) -> bool:
        """The resolved objective has a forget term: the data module yields combined retain/forget batches."""
        return self._resolved is not None and self._resolved.objective in FORGET_AWARE

    # -- extension points: override to change a step -----------------------------------------------
    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ChannelScores:
        """Channel scores of the forget set. Each DDP rank scores its shard; the scores are count-weighted
        over the ranks, so every rank holds the same scores."""
        cfg = self.resolved_config
        dm = trainer.datamodule
        forget, retain = dm.forget_dataloader(), dm.retain_dataloader() if cfg.contrast else None
        world, rank = trainer.world_size, trainer.global_rank
        if world > 1:
            forget = _shard(forget, rank, world)
            retain = _shard(retain, rank, world) if retain is not None else None
        scores = channel_scores(
            pl_module, forget, cfg.method, cfg.layers, retain, cfg.max_samples, cfg.seed, progress=self.progress
        )
        if world > 1:
            device = pl_module.device
            counts = trainer.strategy.all_gather(torch.tensor(float(scores.num_samples), device=device)).cpu()
            gathered = {n: trainer.strategy.all_gather(s.to(device)).cpu() for n, s in scores.items()}
            parts = [({n: g[r] for n, g in gathered.items()}, int(counts[r])) for r in range(world)]
            scores = ChannelScores(average_scores(parts), int(counts.sum()), scores.method, scores.layers)
        return scores

    def select(self, pl_module: pl.LightningModule, scores: ChannelScores) -> ParameterMask:
        """Scores -> mask (:func:`~lightning_unlearn.orchestration.prepare`): the config's ratio, scope and head rows;
        layers the user froze are never selected."""
        return prepare(pl_module, scores, self.resolved_config)

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Refit the forgotten classes' head rows on retain features (:func:`~lightning_unlearn.repair.calibrate_head`)
        with the module's optimizer class and settings for ``calibrate_epochs`` epochs of retain batches. Every rank
        computes the same features from the whole retain set; rank 0's rows are broadcast so all ranks hold them
        bit for bit. Returns the elements written."""
        cfg, dm = self.resolved_config, trainer.datamodule
        loader = dm.retain_dataloader(shuffle=False)
        epochs = cfg.calibration_epochs()
        if cfg.calibrate_epochs == "auto":
            rank_zero_info(f"SelectiveUnlearning: calibrate_epochs='auto' without the original's epochs: {epochs} "
                           "epochs (pass calibrate_epochs=<the original's training epochs>)")
        steps = epochs * len(loader)
        changed = calibrate_head(pl_module, loader, dm.request.classes, self._head, self._optimizer_factory, steps,
                                 cfg.seed, loader.batch_size, forget_loader=dm.forget_dataloader(shuffle=False))
        if trainer.world_size > 1:
            head = linear_head(pl_module, self._head)
            rows = list(dm.request.classes)
            with torch.no_grad():
                for p in (head.weight, head.bias):
                    if p is not None:
                        p[rows] = trainer.strategy.broadcast(p[rows].detach().clone(), src=0)
        return changed

    def reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule, mask: ParameterMask) -> ResetOutcome:
        """Remove the selected slices (:func:`~lightning_unlearn.orchestration.apply_reset`: ``config.reset``,
        seeded, the same on every rank) and re-estimate their BatchNorm statistics on retain data."""
        return apply_reset(pl_module, mask, self.resolved_config, trainer.datamodule.retain_dataloader(shuffle=False))

    # -- set-up -------------------------------------------------------------------------------
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
        self._start_request()  # a new fit is a new request; a checkpoint of this request restores it next
        self._request = dm.request.to_dict()
        cfg = self._resolved = self.config.resolved(dm.request, "central")
        if self.needs_forget_batches and self.config.objective == "auto" and not isinstance(pl_module, UnlearningMixin):
            # the default must run on any LightningModule: without the mixin, the retain-only repair
            rank_zero_warn(f"SelectiveUnlearning: the default objective for this request ({cfg.objective!r}) needs "
                           f"the module to subclass lightning_unlearn.UnlearningMixin ({type(pl_module).__name__} "
                           "does not): repairing on retain data only (objective='retain'); add the mixin for the "
                           "default")
            cfg = self._resolved = dataclasses.replace(cfg, objective="retain")
        if self.needs_forget_batches:
            if not isinstance(pl_module, UnlearningMixin):
                raise TypeError(
                    f"objective {cfg.objective!r} needs the model to subclass lightning_unlearn.UnlearningMixin "
                    f"({type(pl_module).__name__} does not); add the mixin or use objective='retain'"
                )
            pl_module.configure_unlearning(cfg.objective, dm.request.classes, cfg.forget_weight, cfg.seed)
        self._budget = cfg.step_budget(len(dm.retain_dataloader()))
        self._size_trainer(trainer)

    def _size_trainer(self, trainer: pl.Trainer) -> None:
        """Give a Trainer without a step limit the step budget, and one without an epoch limit ``config.epochs``, so
        ``trainer.estimated_stepping_batches`` counts the optimizer steps the repair may take when
        ``configure_optimizers`` sizes a per-step scheduler with it. Lightning calls ``setup`` before it configures
        the optimizers. Limits the user set are kept; the filled ones are put back when the fit ends. The callback
        still stops the fit itself (at the budget, or earlier by the stopping rule)."""
        self._filled_max_steps = self._filled_max_epochs = False
        if trainer.max_steps == -1 and self._budget is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._budget
            self._filled_max_steps = True
            rank_zero_debug(f"SelectiveUnlearning: the Trainer's max_steps set to the step budget ({self._budget})")
        if trainer.max_epochs == -1 and self.resolved_config.epochs is not None:
            trainer.fit_loop.max_epochs = self.resolved_config.epochs
            self._filled_max_epochs = True

    def _restore_trainer_limits(self, trainer: pl.Trainer) -> None:
        """Put back the limits :meth:`_size_trainer` filled: the Trainer is left as it was built."""
        if self._filled_max_steps:
            trainer.fit_loop.epoch_loop.max_steps = -1
        if self._filled_max_epochs:
            trainer.fit_loop.max_epochs = -1
        self._filled_max_steps = self._filled_max_epochs = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cfg = self.resolved_config
        if self._restored and self._uncalibrated_head is not None:
            self._undo_calibration(pl_module)
        if self.mask is None:  # neither given nor restored from a checkpoint
            start = time.perf_counter()
            self.scores = self.score(trainer, pl_module)
            self.timings["scoring"] = time.perf_counter() - start
            self.mask = self.select(pl_module, self.scores)
            rank_zero_info(f"SelectiveUnlearning: {cfg.to_dict()['method']} selected {self.mask.fraction:.2%} of "
                           "parameters")
        self.mask.check(pl_module)
        self.mask = exclude_frozen(self.mask, pl_module)  # a given mask too: what the user froze stays as it is
        dm = trainer.datamodule
        layers = self.scores.layers if self.scores is not None else layer_info(pl_module, dm)
        self._plan = plan_repair(self.mask, cfg, layers, len(dm.retain_dataloader()))
        if cfg.calibrate == "head":
            skip = self._calibration_not_possible(trainer, pl_module) if self.config.calibrate == "auto" else None
            if skip is None:
                self._prepare_calibration(trainer, pl_module)
            else:  # asked by "auto" only: without the calibration nothing would forget, so the reset does
                fallback = {"calibrate": "none"}
                if self.config.reset == "auto":
                    fallback["reset"] = "dampen"
                rank_zero_warn(f"SelectiveUnlearning: no head calibration ({skip}); the selected channels are "
                               f"reset instead ({fallback.get('reset', cfg.reset)}), which may not forget a class on its "
                               "own: select the forgotten head rows (head_rows='auto') or use objective='random_label'")
                self._resolved = cfg = dataclasses.replace(cfg, **fallback)
        self._prepare_stopping(pl_module, dm)
        if cfg.objective in TARGETED and self.forget_targets is None:  # from the original: before the reset
            self.forget_targets = self.heldout_targets(pl_module, dm)
        if not self._restored:  # a resumed run's weights were reset before its checkpoint was written
            start = time.perf_counter()
            outcome = self.reset(trainer, pl_module, self.mask)
            self.timings["reset"] = time.perf_counter() - start
            if outcome.changed:
                rank_zero_info(f"SelectiveUnlearning: reset ({cfg.reset}) {outcome.changed} elements; BatchNorm "
                               f"statistics of the selected channels re-estimated on {outcome.batchnorm_batches} "
                               "retain batches")
            check_finite(pl_module, "after the reset")
        elif self._forget_state is not None and isinstance(pl_module, UnlearningMixin):
            pl_module.load_unlearning_state_dict(self._forget_state)
        self._check_same_mask_on_all_ranks(trainer)
        self._enforcer = MaskEnforcer(pl_module, self.mask, cfg.bn_stats)
        self._enforcer.attach(trainer.optimizers)
        # before Lightning restores the optimizer: a resumed run gets the checkpoint's groups and rates
        if self._learning_rates is None:
            self._learning_rates = self._plan.learning_rates
        self._learning_rates.apply(pl_module, trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs])
        self._fit_start = time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # checks count optimizer steps from here (0, or the restored step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._enforcer is not None:
            self._enforcer.freeze_batchnorm()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._enforcer is not None:
            self._enforcer.zero_frozen_grads()  # before Lightning's gradient clipping: norms of trainable elements

    def _calibration_not_possible(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why ``calibrate="auto"`` cannot calibrate here (None: it can): no Linear head, a given mask that keeps
        the forgotten head rows frozen, or no optimizer."""
        try:
            heads = [n for n, info in layer_info(pl_module, trainer.datamodule).items() if info.is_head]
            head = heads[0] if heads else None
            linear_head(pl_module, head)
            require_rows_in_mask(self.mask.masks, head, trainer.datamodule.request.classes)
        except ValueError as err:
            return str(err)
        return None if trainer.optimizers else "configure_optimizers returned no optimizer"

    def _prepare_calibration(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before any work: a Linear head whose forgotten rows the mask selects, and the module's optimizer
        recipe (its class and first group's settings, before the repair's learning-rate scales)."""
        heads = [n for n, info in layer_info(pl_module, trainer.datamodule).items() if info.is_head]
        self._head = heads[0] if heads else None
        linear_head(pl_module, self._head)
        require_rows_in_mask(self.mask.masks, self._head, trainer.datamodule.request.classes)
        if not trainer.optimizers:
            raise ValueError("calibrate='head' fits with the module's optimizer, but configure_optimizers returned "
                             "none; allowed: a module with an optimizer, or calibrate='none'")
        self._optimizer_factory = optimizer_recipe(trainer.optimizers[0])

    def heldout_targets(self, pl_module: pl.LightningModule, datamodule: Any) -> torch.Tensor:
        """Each forget sample's held-out target under the original (``objective="heldout"``): its softmax with
        the true logit lowered by the class's memorisation gap, measured on seeded retain and test subsamples."""
        cfg = self.resolved_config
        start = time.perf_counter()
        gap = memorisation_gap(pl_module, datamodule.retain_set, datamodule.test_dataset, datamodule.num_classes,
                               GAP_SAMPLES, cfg.seed)
        targets = heldout_targets(pl_module, datamodule.forget_set, gap)
        self.timings["targets"] = time.perf_counter() - start
        rank_zero_info(f"SelectiveUnlearning: held-out targets for {len(targets)} forget samples (memorisation gap "
                       f"per class {[round(float(g), 2) for g in gap]})")
        return targets

    @torch.no_grad()
    def _undo_calibration(self, pl_module: pl.LightningModule) -> None:
        """A resumed repair continues from the head as it was before the checkpointed fit's calibration (that fit
        ended on the Trainer's limits, not on the rule); the calibration runs again when this repair ends."""
        params = dict(pl_module.named_parameters())
        for name, value in self._uncalibrated_head.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"the checkpoint's uncalibrated head {name!r} does not fit the resumed model")
            params[name].copy_(value.to(params[name].device))
        self._uncalibrated_head = None
        rank_zero_info("SelectiveUnlearning: resumed from a calibrated checkpoint: the head rows are back to where the "
                       "repair left them; the calibration runs again at the end")

    def _calibrate_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """The head calibration after the last optimizer step (once per fit); True if it ran now."""
        if self._calibrated or self._resolved is None or self._resolved.calibrate != "head" or self._head is None:
            return False
        self._calibrated = True
        head = dict(pl_module.named_modules())[self._head]
        # a fit ended by the Trainer's own limits may be resumed: the repair then continues from these rows
        self._uncalibrated_head = {f"{self._head}.{n}": p.detach().clone() for n, p in head.named_parameters()}
        start = time.perf_counter()
        changed = self.calibrate(trainer, pl_module)
        self.timings["calibration"] = time.perf_counter() - start
        rank_zero_info(f"SelectiveUnlearning: head calibration refit {changed} elements of {self._head}")
        return True

    # -- the budget and the stopping rule -------------------------------------------------------
    def _prepare_stopping(self, pl_module: pl.LightningModule, datamodule: Any) -> None:
        """Check sets, the original's remaining accuracy (measured before the reset) and the rule's state."""
        cfg, plan = self.resolved_config, self._plan
        if not cfg.early_stopping:
            return
        self._checks = CheckSets(datamodule, cfg.check_samples, cfg.seed)
        if self._reference is None:  # a resumed run keeps the reference of its first start
            self._reference = self._checks.evaluate(pl_module)[2]
        self._rule = StoppingRule(self._reference, cfg.stop_tolerance, cfg.patience,
                                  forgetting_deferred=cfg.calibrate == "head")
        if self._rule_state is not None:
            self._rule.load_state_dict(self._rule_state)
        rank_zero_info(f"SelectiveUnlearning: budget {plan.max_steps} steps, checks every {plan.check_every}; "
                       f"original remaining accuracy on held-out data {self._reference:.2%}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            check_finite_loss(pl_module, loss, trainer.global_step)
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step since the last check
            return
        self._last_step = step
        plan = self._plan
        reason = None
        if self._rule is not None and step % plan.check_every == 0:
            check_finite(pl_module, f"at step {step}")
            forget_acc, target, remaining_acc = self._checks.evaluate(pl_module)
            reason = self._rule.update(step, forget_acc, target, remaining_acc)
            self._pause_forget_term_once_forgotten(pl_module, self._rule.history[-1].forgotten)
            pl_module.log_dict({"unlearn/check_forget_acc": forget_acc, "unlearn/check_remaining_acc": remaining_acc})
            if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
                reason = reason or StopReason.OTHER_RANK  # every rank checks at the same steps
        if reason is None and plan.max_steps is not None and step >= plan.max_steps:
            reason = StopReason.STEP_BUDGET
        if reason is not None:
            self._stop(trainer, pl_module, reason)

    def _pause_forget_term_once_forgotten(self, pl_module: pl.LightningModule, forgotten: bool) -> None:
        """A forget-aware term is the means to forget, not the repair: once held-out data shows the forget data
        forgotten it is paused (weight 0) so it stops pulling shared features away from the retain data; a
        later check that shows the data back resumes it."""
        cfg = self.resolved_config
        if self.needs_forget_batches and cfg.objective not in TARGETED and isinstance(pl_module, UnlearningMixin):
            pl_module.forget_weight = 0.0 if forgotten else cfg.forget_weight

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: StopReason) -> None:
        trainer.should_stop = True
        if self._calibrate_once(trainer, pl_module) and self._rule is not None:
            # the verdict below is about the model the fit returns: check it once more after the calibration,
            # which must now have done the forgetting itself
            self._rule.forgetting_deferred = False
            self._rule.update(trainer.global_step, *self._checks.evaluate(pl_module))
        check_finite(pl_module, f"at step {trainer.global_step}")
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

    # -- metrics and the end of the fit ------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = self.resolved_config.epochs
        if epochs is not None and trainer.current_epoch + 1 >= epochs and not trainer.should_stop:
            self._stop(trainer, pl_module, StopReason.EPOCHS)
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
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_once(trainer, pl_module)  # the Trainer's own limits ended the fit

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enforcer is not None:
            self._enforcer.restore()
            self._enforcer.detach()
        check_finite(pl_module, "at the end of the repair")
        self.timings["unlearning"] = time.perf_counter() - self._fit_start
        self.steps = trainer.global_step
        if self.stop_reason is None:
            self.stop_reason = StopReason.TRAINER  # the Trainer's own max_epochs / max_steps ended the fit first

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit stopped by an error (Lightning then skips ``teardown``): frozen elements back, hooks off."""
        if self._enforcer is not None:
            self._enforcer.restore()
            self._enforcer.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._enforcer is not None:
            self._enforcer.detach()
        self._restore_trainer_limits(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_trainer_limits(trainer)  # a failed fit skips teardown

    # -- checkpoints: everything a resumed run needs to continue exactly ----------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        forget = None
        module = self._enforcer.model if self._enforcer is not None else None
        if self.needs_forget_batches and isinstance(module, UnlearningMixin):
            forget = module.unlearning_state_dict()
        return {
            "mask": None if self.mask is None else self.mask.to_checkpoint(),
            "bn_stats": self.config.bn_stats,
            "scores": None if self.scores is None else self.scores.state_dict(),
            "config": self.config.to_dict(),
            "request": self._request,
            "stopping_reference": self._reference,
            "stopping": None if self._rule is None else self._rule.state_dict(),
            "learning_rates": None if self._learning_rates is None else self._learning_rates.state_dict(),
            "forget_term": forget,
            "forget_targets": self.forget_targets,
            "uncalibrated_head": self._uncalibrated_head,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_request = state_dict.get("request")
        if self._request is not None and saved_request is not None and saved_request != self._request:
            raise ValueError(f"the checkpoint holds unlearning state of request {saved_request}, not of this fit's "
                             f"request {self._request}; resume with the checkpoint's request or start without it")
        if state_dict.get("mask") is None:
            return
        had_mask = self._given_mask is not None
        self.mask = ParameterMask.from_checkpoint(state_dict["mask"])
        self._restored = True
        if state_dict.get("scores") is not None:
            self.scores = ChannelScores.from_state_dict(state_dict["scores"])
        if state_dict.get("stopping_reference") is not None:
            self._reference = float(state_dict["stopping_reference"])
        self._rule_state = state_dict.get("stopping")
        if state_dict.get("learning_rates") is not None:
            self._learning_rates = LearningRateGroups.from_state_dict(state_dict["learning_rates"])
        self._forget_state = state_dict.get("forget_term")
        if state_dict.get("forget_targets") is not None:  # computed from the original, which a resumed run no longer holds
            self.forget_targets = state_dict["forget_targets"]
        self._uncalibrated_head = state_dict.get("uncalibrated_head")
        saved = state_dict.get("config") or {}
        current = self.config.to_dict()
        changed = [k for k in SELECTION_SETTINGS if k in saved and saved[k] != current[k]]
        if changed or had_mask:
            rank_zero_warn(f"SelectiveUnlearning resumes with the checkpoint's mask ({self.mask.sha256()[:12]}); "
                           f"this callback's {', '.join(changed) or 'mask'} setting does not apply to it")


def check_finite_loss(pl_module: pl.LightningModule, loss: torch.Tensor, step: int) -> None:
    """The loss of every training batch must be finite (one NaN input turns every later step non-finite)."""
    if not bool(torch.isfinite(loss.detach()).all()):
        check_finite(pl_module, f"at step {step}", loss)


def _shard(loader: DataLoader, rank: int, world: int) -> DataLoader:
    indices = list(range(rank, len(loader.dataset), world))
    return DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size or 64, shuffle=False)
