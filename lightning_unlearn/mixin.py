"""UnlearningMixin: forget-aware objectives for an unmodified LightningModule."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lightning_unlearn.objectives import capped_ascent_loss, random_label_loss


class UnlearningMixin:
    """Mix into a LightningModule (first or last among its bases) to enable the forget-aware objectives.

    The module keeps its own ``forward``, ``training_step`` (for ordinary ``(x, y)`` batches)
    and ``configure_optimizers``. During unlearning the library feeds combined batches
    ``{"retain": (x, y), "forget": (x, y)}``: the retain half goes through the user's
    ``training_step`` unchanged, the forget half through :meth:`forget_loss`.
    Override :meth:`forget_loss` for a custom objective.
    """

    unlearning_objective: str = "retain"
    forget_classes: Sequence[int] = ()
    forget_weight: float = 1.0
    ascent_cap: float | None = None

    def configure_unlearning(
        self, objective: str, forget_classes: Sequence[int] = (), forget_weight: float = 1.0, seed: int = 0
    ) -> None:
        self.unlearning_objective = objective
        self.forget_classes = tuple(forget_classes)
        self.forget_weight = forget_weight
        self._label_generator = torch.Generator().manual_seed(seed)

    def forget_loss(self, batch: Any) -> Tensor:
        """Loss on a forget batch ``(x, y)`` for the configured objective; calls the user's ``forward``."""
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.unlearning_objective == "random_label":
            return random_label_loss(logits, y, self.forget_classes, getattr(self, "_label_generator", None))
        if self.unlearning_objective == "ascent":
            return capped_ascent_loss(logits, y, self.ascent_cap)
        raise ValueError(f"objective {self.unlearning_objective!r} has no forget term")

    def unlearning_step(self, batch: dict, batch_idx: int, user_step: Callable[..., Any]) -> Tensor | None:
        """One step on a combined batch: user's retain loss + ``forget_weight`` * forget loss."""
        out = user_step(batch["retain"], batch_idx)
        retain_loss = out["loss"] if isinstance(out, dict) else out
        forget_loss = self.forget_loss(batch["forget"])
        self.log("unlearn/forget_loss", forget_loss.detach(), prog_bar=False, batch_size=len(batch["forget"][1]))
        return forget_loss * self.forget_weight if retain_loss is None else retain_loss + self.forget_weight * forget_loss
