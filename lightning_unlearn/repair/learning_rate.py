"""Learning rates of the repair: a larger step for the few selected parameters, without touching the user's code.

Masked unlearning is a handful of steps on a few channels: a larger step than the user's training rate makes
them count. Every parameter group's rate is multiplied by ``factor``; ``params`` (``{parameter name: factor}``,
e.g. the head, whose only trainable elements are the forgotten classes' rows) move into their own groups with
their own factor. Schedulers that compute from base rates (``LambdaLR``, ``OneCycleLR``, ...) are scaled and
extended too, so the factors survive their steps. Applied before the optimizer state is restored from a
checkpoint (Lightning's ``on_fit_start``), a resumed run gets the same groups and the checkpoint's rates.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from torch import nn
from torch.optim import Optimizer

#: Keys of a parameter group that hold a learning rate (``initial_lr``: set by schedulers; the rest: OneCycleLR).
GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")
#: Per-group lists of a scheduler that hold learning rates; other per-group lists are copied for a new group.
SCHEDULER_RATES = ("base_lrs", "_last_lr", "max_lrs")


class LearningRateGroups:
    """Multiply every group's learning rate by ``factor``; ``params`` by their own factor in their own groups.

    Args:
        factor: multiplier of every learning rate (> 0).
        params: ``{parameter name: factor}`` for parameters that get their own group and rate.
    """

    def __init__(self, factor: float = 1.0, params: Mapping[str, float] | None = None) -> None:
        for f in (factor, *(params or {}).values()):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise ValueError(f"lr_scale must be a finite number > 0, got {f!r}")
        self.factor, self.params = float(factor), {str(k): float(v) for k, v in (params or {}).items()}

    @property
    def is_identity(self) -> bool:
        return self.factor == 1.0 and all(f == 1.0 for f in self.params.values())

    def apply(self, model: nn.Module, optimizers: Iterable[Any], schedulers: Iterable[Any] = ()) -> int:
        """Scale and split the groups of ``optimizers`` (and their ``schedulers``) once; returns the groups added."""
        if self.is_identity:
            return 0
        names = {id(p): n for n, p in model.named_parameters()}
        schedulers = list(schedulers)
        added = 0
        for opt in optimizers:
            opt = _inner(opt)
            own = [_scheduler for _scheduler in schedulers if _inner(getattr(_scheduler, "optimizer", None)) is opt]
            added += self._apply_one(opt, own, names)
        return added

    def _apply_one(self, opt: Optimizer, schedulers: list[Any], names: Mapping[int, str]) -> int:
        before = len(opt.param_groups)
        extra: list[tuple[int, float, list]] = []  # (source group, factor, parameters)
        originals = [dict(g) for g in opt.param_groups]
        for i, group in enumerate(opt.param_groups):
            split: dict[float, list] = {}
            for p in group["params"]:
                if names.get(id(p)) in self.params:
                    split.setdefault(self.params[names[id(p)]], []).append(p)
            _scale(group, originals[i], self.factor)
            if split:
                group["params"] = [p for p in group["params"] if names.get(id(p)) not in self.params]
                extra += [(i, f, ps) for f, ps in split.items()]
        for i, f, ps in extra:
            new = {k: v for k, v in originals[i].items() if k != "params"}
            _scale(new, originals[i], f)
            new["params"] = ps
            opt.add_param_group(new)
        for scheduler in schedulers:
            for attr, value in list(vars(scheduler).items()):
                if not isinstance(value, list) or len(value) != before:
                    continue
                rates = attr in SCHEDULER_RATES
                scaled = [v * self.factor for v in value] if rates else list(value)
                scaled += [value[i] * f if rates else value[i] for i, f, _ in extra]
                setattr(scheduler, attr, scaled)
        return len(extra)

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "params": dict(self.params)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "LearningRateGroups":
        return cls(state["factor"], state["params"])


def _scale(group: dict, original: Mapping[str, Any], factor: float) -> None:
    for key in GROUP_RATES:
        value = original.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            group[key] = value * factor


def _inner(opt: Any) -> Any:
    """LightningOptimizer -> the torch optimizer it wraps."""
    return getattr(opt, "optimizer", opt) if opt is not None and not isinstance(opt, Optimizer) else opt
