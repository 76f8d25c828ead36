"""DifferentialPrivacy: DP-SGD (Opacus) for an unmodified LightningModule, as one Trainer callback.

Why a callback and not ``opacus.lightning``: that module subclasses the old ``pytorch_lightning``
package. Here the three things ``PrivacyEngine.make_private`` returns are put where Lightning
2.x looks for them, at ``on_fit_start`` (optimizers exist, data is not loaded yet):

* per-sample gradient hooks on the user's module itself (``wrap_model=False``: the Trainer keeps
  calling the user's ``training_step``);
* the ``DPOptimizer`` (clip per sample, add noise, then the user's optimizer) replaces the Trainer's;
* the Poisson-sampled ``DPDataLoader`` replaces the train data source.

BatchNorm and other layers Opacus cannot train are replaced in ``setup``, before the optimizer
is built. The accountant lives in the callback, so several fits with the same callback (federated
rounds) add up to one epsilon.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_unlearn.privacy._opacus import require_opacus
from lightning_unlearn.privacy.accounting import check_accountant, check_delta, check_epsilon, noise_for
from lightning_unlearn.privacy.compat import dp_compatibility_errors, make_dp_compatible, UnsupportedModelError

LOSS_REDUCTIONS = ("mean", "sum")


class DifferentialPrivacy(Callback):
    """Train with DP-SGD: per-sample clipping to ``max_grad_norm`` plus Gaussian noise, Poisson batches.

    Give either ``target_epsilon`` (noise is calibrated once, for the planned length of training)
    or ``noise_multiplier``. Epsilon at ``delta`` is logged as ``dp/epsilon`` after every epoch
    and kept in :attr:`history`.

    Args:
        target_epsilon: privacy budget for the whole planned training, > 0.
        noise_multiplier: noise std / clipping norm, > 0 (instead of ``target_epsilon``).
        max_grad_norm: per-sample clipping norm, > 0.
        delta: the delta of (epsilon, delta)-DP; keep it below 1 / number of training samples.
        epochs, steps: the planned length the budget is for (default: the Trainer's
            ``max_epochs``/``max_steps``). Pass it when one callback serves several fits
            (federated rounds): the budget covers all of them.
        poisson_sampling: sample each batch by including every sample independently (the
            accountant's assumption). ``False`` keeps the user's loader and needs ``noise_multiplier``.
        accountant: ``"rdp"`` (default), ``"prv"`` or ``"gdp"``.
        fix_model: replace BatchNorm & co. in place (reported with a warning and in :attr:`replaced`);
            ``False`` raises on such layers instead.
        loss_reduction: how the user's loss reduces over the batch (``"mean"`` or ``"sum"``).
        secure_mode: Opacus' cryptographically safe noise (needs ``torchcsprng``); use it for a release.
    """

    def __init__(
        self,
        target_epsilon: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        epochs: int | None = None,
        steps: int | None = None,
        poisson_sampling: bool = True,
        accountant: str = "rdp",
        fix_model: bool = True,
        loss_reduction: str = "mean",
        secure_mode: bool = False,
    ) -> None:
        require_opacus()
        if (target_epsilon is None) == (noise_multiplier is None):
            raise ValueError(
                f"give exactly one of target_epsilon and noise_multiplier; got target_epsilon={target_epsilon!r}, "
                f"noise_multiplier={noise_multiplier!r}"
            )
        if target_epsilon is not None:
            check_epsilon(target_epsilon)
            if not poisson_sampling:
                raise ValueError(
                    "target_epsilon needs Poisson sampling: the accountant's epsilon assumes every sample joins every "
                    "batch independently, which a shuffled fixed-size loader (poisson_sampling=False) does not do. "
                    "Allowed: poisson_sampling=True with target_epsilon, or poisson_sampling=False with noise_multiplier"
                )
        if noise_multiplier is not None and not (
            isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0 and math.isfinite(noise_multiplier)
        ):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; allowed: (0, inf)")
        if not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}; allowed: (0, inf)")
        for name, value in (("epochs", epochs), ("steps", steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if epochs is not None and steps is not None:
            raise ValueError(f"give at most one of epochs and steps; got epochs={epochs}, steps={steps}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"unknown loss_reduction {loss_reduction!r}; allowed values are {list(LOSS_REDUCTIONS)}")
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.max_grad_norm, self.delta = float(max_grad_norm), check_delta(delta)
        self.epochs, self.steps, self.poisson_sampling = epochs, steps, poisson_sampling
        self.accountant, self.fix_model = check_accountant(accountant), fix_model
        self.loss_reduction, self.secure_mode = loss_reduction, secure_mode
        self.enabled = True
        self.replaced: list[str] = []
        self.history: list[dict[str, float]] = []
        self.sample_rate: float | None = None
        self._engine = None
        self._fits = 0
        self._hooks = None
        self._source = None
        self._active = False
        self._epsilon_cache: tuple[tuple | None, float] = (None, 0.0)

    # -- what the user reads -------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if self._engine is None or not self._engine.accountant.history:
            return 0.0
        key = tuple(tuple(h) for h in self._engine.accountant.history)
        if self._epsilon_cache[0] != key:  # RDP at fractional orders is slow for large sampling rates
            self._epsilon_cache = (key, float(self._engine.get_epsilon(self.delta)))
        return self._epsilon_cache[1]

    @property
    def steps_taken(self) -> int:
        return 0 if self._engine is None else sum(int(s) for *_, s in self._engine.accountant.history)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the guarantee and how it was reached."""
        return {"epsilon": self.epsilon, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "steps": self.steps_taken, "accountant": self.accountant,
                "poisson_sampling": self.poisson_sampling, "replaced": list(self.replaced)}

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before the optimizer exists: check the run and make the model trainable by Opacus."""
        if stage != "fit" or not self.enabled:
            return
        if trainer.world_size > 1:
            raise ValueError(f"DifferentialPrivacy runs on one device/process; got world_size={trainer.world_size}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"DifferentialPrivacy needs accumulate_grad_batches=1 (a Poisson batch is one DP step), "
                f"got {trainer.accumulate_grad_batches}; raise the batch size instead"
            )
        if self.fix_model:
            replaced = make_dp_compatible(pl_module)
            if replaced:
                self.replaced += replaced
                rank_zero_warn(
                    "DifferentialPrivacy replaced layers Opacus cannot train (ModuleValidator.fix): " + "; ".join(replaced)
                )
        else:
            errors = dp_compatibility_errors(pl_module)
            if errors:
                raise UnsupportedModelError(
                    f"{type(pl_module).__name__} cannot be trained with DP-SGD: " + "; ".join(errors)
                    + ". Pass fix_model=True to replace them (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...)"
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if len(trainer.optimizers) != 1:
            raise ValueError(f"DifferentialPrivacy supports exactly one optimizer, got {len(trainer.optimizers)}")
        loader = self._train_loader(trainer)
        self.sample_rate = 1.0 / len(loader)
        if self.target_epsilon is not None and self._fits == 0:
            planned = self._planned_steps(trainer, len(loader))
            self.noise_multiplier = noise_for(self.target_epsilon, self.sample_rate, planned, self.delta, self.accountant)
        engine = self._get_engine()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*new dataset object.*")  # a client's retain split, same data
            self._hooks, dp_optimizer, dp_loader = engine.make_private(
                module=pl_module, optimizer=_unwrap(trainer.optimizers[0]), data_loader=loader,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                poisson_sampling=self.poisson_sampling, loss_reduction=self.loss_reduction, wrap_model=False,
            )
        self._hooks.disable_hooks()  # on only inside training batches (see on_train_batch_start)
        trainer.strategy.optimizers = [dp_optimizer]
        self._source = trainer.fit_loop._data_source
        trainer.fit_loop._data_source = type(self._source)(dp_loader, "train_dataloader")
        self._fits += 1
        self._active = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Per-sample hooks only around training steps: other forward/backward passes (attribution
        scoring in another callback's ``on_fit_start``, eval-mode saliency) must not feed Opacus."""
        if self._active and self._hooks is not None:
            self._hooks.enable_hooks()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._active and self._hooks is not None:
            self._hooks.disable_hooks()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        epsilon = self.epsilon
        self.history.append({"fit": self._fits - 1, "epoch": trainer.current_epoch, "steps": self.steps_taken,
                             "epsilon": epsilon})
        pl_module.log("dp/epsilon", epsilon, on_epoch=True, prog_bar=True, batch_size=1)
        if self.target_epsilon is not None and epsilon > self.target_epsilon * 1.02:
            rank_zero_warn(
                f"DP epsilon {epsilon:.3f} is past target_epsilon={self.target_epsilon} (training ran longer than the "
                f"planned {self.epochs or self.steps or 'Trainer'} epochs/steps the noise was calibrated for)"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the per-sample hooks and ``grad_sample`` fields: later plain use of the model is unaffected."""
        if self._hooks is not None:
            cleanup = getattr(self._hooks, "cleanup", None) or self._hooks._close  # Opacus 1.6 / 1.5
            cleanup()
            self._hooks = None
        if self._source is not None:
            trainer.fit_loop._data_source = self._source
            self._source = None
        self._active = False

    @override
    def state_dict(self) -> dict[str, Any]:
        history = [] if self._engine is None else [list(h) for h in self._engine.accountant.history]
        return {"noise_multiplier": self.noise_multiplier, "accountant_history": history, "fits": self._fits,
                "history": list(self.history), "replaced": list(self.replaced)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run keeps counting from the checkpoint's privacy spend."""
        self.noise_multiplier = state_dict.get("noise_multiplier", self.noise_multiplier)
        self._get_engine().accountant.history = [tuple(h) for h in state_dict.get("accountant_history", [])]
        self._fits = state_dict.get("fits", self._fits)
        self.history = list(state_dict.get("history", []))
        self.replaced = list(state_dict.get("replaced", []))

    # -- helpers -------------------------------------------------------------------------------
    def _get_engine(self):
        if self._engine is None:
            opacus = require_opacus()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")  # documented: secure_mode
                self._engine = opacus.PrivacyEngine(accountant=self.accountant, secure_mode=self.secure_mode)
        return self._engine

    def _train_loader(self, trainer: pl.Trainer) -> DataLoader:
        loader = trainer.fit_loop._data_source.dataloader()
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"DifferentialPrivacy needs one torch DataLoader of (input, label) batches, got {type(loader).__name__}; "
                "combined or dict loaders (e.g. forget-aware unlearning objectives) cannot be Poisson-sampled. "
                "Allowed: a DataLoader over a map-style dataset (for unlearning: objective='retain')"
            )
        if isinstance(loader.dataset, IterableDataset) and self.poisson_sampling:
            raise ValueError(
                f"Poisson sampling needs a map-style dataset, got the IterableDataset {type(loader.dataset).__name__}; "
                "allowed: a map-style Dataset, or poisson_sampling=False with noise_multiplier"
            )
        if len(loader) == 0:
            raise ValueError("DifferentialPrivacy got an empty train DataLoader")
        return loader

    def _planned_steps(self, trainer: pl.Trainer, batches_per_epoch: int) -> int:
        """Steps the budget must cover: ``steps``, ``epochs`` x batches, else what the Trainer will run."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * batches_per_epoch
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches_per_epoch = min(batches_per_epoch, limit)
        elif isinstance(limit, float) and limit < 1.0:
            batches_per_epoch = max(1, int(batches_per_epoch * limit))
        candidates = []
        if trainer.max_epochs not in (None, -1):
            candidates.append(trainer.max_epochs * batches_per_epoch)
        if trainer.max_steps not in (None, -1):
            candidates.append(trainer.max_steps)
        if not candidates:
            raise ValueError("target_epsilon needs the planned training length: pass epochs= or steps=, "
                             "or set the Trainer's max_epochs / max_steps")
        return min(candidates)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """LightningOptimizer -> the user's torch optimizer."""
    return getattr(optimizer, "_optimizer", getattr(optimizer, "optimizer", optimizer))
