"""ScaleLearningRate: a larger step for the few selected parameters, without touching the user's optimizer code."""
from __future__ import annotations

import math
from typing import Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class ScaleLearningRate(Callback):
    """Multiply every optimizer's learning rate by ``factor`` for this fit; ``params`` by their own factor.

    Masked unlearning is a handful of steps on a few channels: a larger step than the user's
    training rate makes them count, without touching the user's ``configure_optimizers``.
    ``params`` (``{parameter name: factor}``, e.g. the head whose only trainable elements are the
    forgotten classes' rows) are moved into their own parameter groups with ``lr * factor``
    (instead of ``lr * self.factor``); the optimizer has no state yet at train start.
    """

    def __init__(self, factor: float = 1.0, params: Mapping[str, float] | None = None) -> None:
        for f in (factor, *(params or {}).values()):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise ValueError(f"lr_scale must be a finite number > 0, got {f!r}")
        self.factor, self.params = float(factor), dict(params or {})

    @property
    def is_identity(self) -> bool:
        return self.factor == 1.0 and all(f == 1.0 for f in self.params.values())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        own = {id(p): self.params[n] for n, p in pl_module.named_parameters() if n in self.params}
        for opt in trainer.optimizers:
            opt = getattr(opt, "optimizer", opt)
            extra = []
            for group in opt.param_groups:
                lr = group["lr"]
                group["lr"] = lr * self.factor
                split: dict[float, list] = {}
                for p in group["params"]:
                    if id(p) in own:
                        split.setdefault(own[id(p)], []).append(p)
                if split:
                    group["params"] = [p for p in group["params"] if id(p) not in own]
                    for f, ps in split.items():
                        extra.append({**{k: v for k, v in group.items() if k != "params"}, "params": ps, "lr": lr * f})
            for g in extra:
                opt.add_param_group(g)
