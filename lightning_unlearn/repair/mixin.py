"""UnlearningMixin: forget-aware objectives for an unmodified LightningModule."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from lightning_unlearn.repair.objectives import capped_ascent_loss, heldout_loss, random_label_loss


class UnlearningMixin:
    """Mix into a LightningModule (first or last among its bases) to enable the forget-aware objectives.

    The module keeps its own ``forward``, ``training_step`` (for ordinary ``(x, y)`` batches)
    and ``configure_optimizers``. During unlearning the data module feeds combined batches
    ``{"retain": (x, y), "forget": (x, y)}``; the mixin dispatches them itself: the ``training_step`` of
    every subclass is wrapped once, when the class is created, so a combined batch goes to
    :meth:`unlearning_step` (the retain half through the user's ``training_step`` unchanged, the
    forget half through :meth:`forget_loss`) and any other batch straight to the user's step.
    Nothing is replaced on an instance. Override :meth:`forget_loss` for a custom objective.
    """

    unlearning_objective: str = "retain"
    forget_classes: Sequence[int] = ()
    forget_weight: float = 1.0
    ascent_cap: float | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = getattr(cls, "training_step", None)  # the class's own, or the one its bases (any order) give it
        if step is not None and not getattr(step, "_dispatches_combined_batches", False):
            cls.training_step = _dispatching(step)

    def configure_unlearning(
        self, objective: str, forget_classes: Sequence[int] = (), forget_weight: float = 1.0, seed: int = 0
    ) -> None:
        self.unlearning_objective = objective
        self.forget_classes = tuple(forget_classes)
        self.forget_weight = forget_weight
        self._label_generator = torch.Generator().manual_seed(seed)

    def unlearning_state_dict(self) -> dict[str, Any]:
        """The forget term's state (weight, random-label generator): a resumed repair draws the same labels."""
        generator = getattr(self, "_label_generator", None)
        return {"forget_weight": self.forget_weight, "generator": None if generator is None else generator.get_state()}

    def load_unlearning_state_dict(self, state: dict[str, Any]) -> None:
        self.forget_weight = float(state["forget_weight"])
        if state.get("generator") is not None:
            self._label_generator = torch.Generator()
            self._label_generator.set_state(state["generator"])

    def forget_loss(self, batch: Any) -> Tensor:
        """Loss on a forget batch ``(x, y)`` (``(x, y, target)`` for ``"heldout"``) for the configured objective;
        calls the user's ``forward``."""
        x, y = batch[0], batch[1]
        logits = self(x)
        if self.unlearning_objective == "random_label":
            return random_label_loss(logits, y, self.forget_classes, getattr(self, "_label_generator", None))
        if self.unlearning_objective == "ascent":
            return capped_ascent_loss(logits, y, self.ascent_cap)
        if self.unlearning_objective == "heldout":
            if len(batch) < 3:
                raise ValueError("objective 'heldout' needs forget batches (x, y, target) with the original's held-out "
                                 "targets; run it through SelectiveUnlearning, which computes them at fit start")
            return heldout_loss(logits, batch[2])
        raise ValueError(f"objective {self.unlearning_objective!r} has no forget term")

    def unlearning_step(self, batch: dict, batch_idx: int, user_step: Callable[..., Any]) -> Tensor | None:
        """One step on a combined batch: user's retain loss + ``forget_weight`` * forget loss."""
        out = user_step(batch["retain"], batch_idx)
        retain_loss = out["loss"] if isinstance(out, dict) else out
        forget_loss = self.forget_loss(batch["forget"])
        self.log("unlearn/forget_loss", forget_loss.detach(), prog_bar=False, batch_size=len(batch["forget"][1]))
        return forget_loss * self.forget_weight if retain_loss is None else retain_loss + self.forget_weight * forget_loss


def is_combined_batch(batch: Any) -> bool:
    """A batch of the combined retain/forget loader."""
    return isinstance(batch, dict) and "forget" in batch and "retain" in batch


def _dispatching(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self, batch, batch_idx=0, *args, **kwargs):
        if is_combined_batch(batch):
            return self.unlearning_step(batch, batch_idx, functools.partial(step, self))
        return step(self, batch, batch_idx, *args, **kwargs)

    training_step._dispatches_combined_batches = True
    return training_step
