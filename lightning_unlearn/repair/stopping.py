"""When to stop repairing: the forget data is forgotten and the remaining data is repaired, on held-out data.

Remove-then-repair resets the selected channels and retrains only them on retain data. Too few steps leave
remaining accuracy damaged; too many waste the budget that makes unlearning cheaper than retraining. The
rule checks two held-out numbers every few steps and stops as soon as both hold:

* **forgotten**: accuracy on forget-like data is at most its target plus a tolerance. For a class request
  the target is 0 (a model retrained without the class never predicts it), measured on held-out samples
  of the class. For sample and client requests the target is what a retrained model scores on the forget
  samples: its accuracy on held-out data of the same classes (weighted by the forget set's class mix),
  so the samples look unseen, not mislabelled. A forget accuracy far *below* the target is over-forgetting
  and is flagged in the history.
* **recovered**: accuracy on held-out remaining data is within the tolerance of the original model's.

Patience stops a repair whose remaining accuracy no longer improves; the step budget is the hard cap.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.metrics import ClassAccuracy, run_metric


#: A forget accuracy this many tolerances below its (non-zero) target is flagged as over-forgetting.
OVERFORGET_TOLERANCES = 5


class StopReason(str, Enum):
    """Why a repair ended (a ``str``: compares and serialises as its value, e.g. ``"step budget"``)."""

    FORGOTTEN_AND_RECOVERED = "forgotten and recovered"
    RECOVERED = "recovered (the calibration forgets)"
    PLATEAU = "plateau"
    STEP_BUDGET = "step budget"
    EPOCHS = "epochs"
    OTHER_RANK = "another rank's check"
    TRAINER = "trainer"  # the Trainer's own max_epochs / max_steps ended the fit first

    def __str__(self) -> str:
        return self.value


@dataclass
class Check:
    """One evaluation of the rule (accuracies in [0, 1])."""

    step: int
    forget_acc: float
    forget_target: float
    remaining_acc: float
    remaining_reference: float
    forgotten: bool
    recovered: bool
    over_forgotten: bool
    reason: str | None = None


class StoppingRule:
    """Decide from successive checks whether to stop; every check is kept in :attr:`history`.

    Args:
        reference: the original model's accuracy on the held-out remaining data.
        tolerance: accuracy tolerance (e.g. 0.01 = one point).
        patience: checks without progress (a new best remaining accuracy or, until forgotten, a new lowest
            forget accuracy) before stopping.
    """

    def __init__(self, reference: float, tolerance: float = 0.01, patience: int = 3,
                 forgetting_deferred: bool = False) -> None:
        self.reference, self.tolerance, self.patience = float(reference), float(tolerance), int(patience)
        #: a later step (the head calibration) does the forgetting: stop as soon as the repair has recovered
        self.forgetting_deferred = bool(forgetting_deferred)
        self.history: list[Check] = []
        self._best, self._lowest_forget = -1.0, 2.0
        self._stale = 0

    def state_dict(self) -> dict[str, Any]:
        """Every check, the best values and the patience count: a resumed repair decides as an uninterrupted one."""
        return {"history": self.rows(), "best": self._best, "lowest_forget": self._lowest_forget, "stale": self._stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [Check(**row) for row in state["history"]]
        self._best, self._lowest_forget = float(state["best"]), float(state["lowest_forget"])
        self._stale = int(state["stale"])

    def update(self, step: int, forget_acc: float, forget_target: float, remaining_acc: float) -> StopReason | None:
        """Record a check; returns why to stop (:class:`StopReason`) or None."""
        forgotten = forget_acc <= forget_target + self.tolerance
        recovered = remaining_acc >= self.reference - self.tolerance
        over = forget_target > 0 and forget_acc < forget_target - OVERFORGET_TOLERANCES * self.tolerance
        # progress: a new best remaining accuracy, or (not yet forgotten) a new lowest forget accuracy
        improved = remaining_acc > self._best or (
            not forgotten and not self.forgetting_deferred and forget_acc < self._lowest_forget)
        self._best = max(self._best, remaining_acc)
        self._lowest_forget = min(self._lowest_forget, forget_acc)
        self._stale = 0 if improved else self._stale + 1
        reason = None
        if forgotten and recovered:
            reason = StopReason.FORGOTTEN_AND_RECOVERED
        elif self.forgetting_deferred and recovered:
            reason = StopReason.RECOVERED
        elif self._stale >= self.patience:
            reason = StopReason.PLATEAU
        self.history.append(Check(step, forget_acc, forget_target, remaining_acc, self.reference, forgotten,
                                  recovered, over, None if reason is None else reason.value))
        return reason

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(c) for c in self.history]


class CheckSets:
    """Seeded held-out subsets for the rule, built once from an :class:`UnlearningDataModule`.

    ``forget``: held-out samples of the forgotten classes (class requests) or the forget samples
    themselves (sample and client requests: their target comes from held-out data). ``remaining``:
    held-out samples of the classes kept. ``forget_class_weights``: the forget set's class mix.
    """

    def __init__(self, datamodule, max_samples: int = 512, seed: int = 0) -> None:
        dm = datamodule
        self.is_class_request = bool(dm.request.classes)
        rng = np.random.default_rng(seed)
        self.batch_size, self.num_classes = dm.batch_size, dm.num_classes
        if self.is_class_request and len(dm.forget_test_indices):
            self.forget = _subset(dm.test_dataset, dm.forget_test_indices, max_samples, rng)
        else:
            self.forget = _subset(dm.train_dataset, dm.forget_indices, max_samples, rng)
        self.remaining = _subset(dm.test_dataset, dm.remaining_test_indices, max_samples, rng)
        forget_targets = dm.train_targets[torch.as_tensor(dm.forget_indices)]
        counts = torch.bincount(forget_targets, minlength=dm.num_classes).double()
        self.forget_class_weights = counts / counts.sum()
        # every check reads the same two sets: their loaders and metrics are built once, reset per check
        self._loaders = (DataLoader(self.forget, self.batch_size), DataLoader(self.remaining, self.batch_size))
        self._metrics = tuple(ClassAccuracy(self.num_classes, sync_on_compute=False) for _ in range(2))

    def evaluate(self, model: nn.Module) -> tuple[float, float, float]:
        """``(forget accuracy, its target, remaining accuracy)`` of ``model``; module modes are restored."""
        forget, remaining = (run_metric(model, loader, metric).compute()
                             for loader, metric in zip(self._loaders, self._metrics))
        if self.is_class_request:
            target = 0.0
        else:  # held-out accuracy per class, weighted by the forget set's class mix (absent classes: overall)
            per_class = torch.tensor(remaining["per_class"], dtype=torch.float64).nan_to_num(remaining["acc"])
            target = float((per_class * self.forget_class_weights).sum())
        return forget["acc"], target, remaining["acc"]


def _subset(dataset: Dataset, indices: Sequence[int], max_samples: int, rng: np.random.Generator) -> Subset:
    indices = np.asarray(indices)
    if len(indices) > max_samples:
        indices = np.sort(rng.choice(indices, size=max_samples, replace=False))
    return Subset(dataset, indices.tolist())


#: The usual causes of a non-finite repair. BatchNorm kept in eval mode (``bn_stats="frozen"``) loses its invariance to
#: the scale of the weights before it, so a rate tuned with batch statistics can be too large for the repair.
TOO_FAST = ("non-finite input data, or a learning rate too large for the repair? lower lr_scale; with BatchNorm in "
            "eval mode (bn_stats='frozen') the module's own rate can be too large")


class NonFiniteError(ValueError):
    """The repair produced a non-finite loss, parameter or BatchNorm statistic: the run is refused, not reported."""


def check_finite(model: nn.Module, where: str, loss: torch.Tensor | None = None) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite loss, parameter or normalisation running statistic
    of ``model`` (other buffers may hold infinities on purpose, e.g. attention masks)."""
    if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteError(f"unlearning stopped {where}: the loss is {float(loss.detach().float().mean())} "
                             f"({TOO_FAST}); no result is reported")
    statistics = [(f"{name}.{stat}" if name else stat, getattr(module, stat))
                  for name, module in model.named_modules() for stat in ("running_mean", "running_var")
                  if isinstance(getattr(module, stat, None), torch.Tensor)]
    for name, tensor in [*model.named_parameters(), *statistics]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            raise NonFiniteError(f"unlearning stopped {where}: {name} holds non-finite values ({TOO_FAST}); no "
                                 "result is reported")
