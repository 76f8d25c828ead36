"""One code path for every engine: scores -> mask (:func:`prepare`) -> reset (:func:`apply_reset`) -> repair plan.

The central callback, the in-process federated server and the Flower server all call these three functions
with the same resolved :class:`~lightning_unlearn.UnlearnConfig`; only where the data lives differs (the
federated engines estimate BatchNorm statistics with the clients, the central one on local retain data).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from lightning_unlearn.config import FORGET_AWARE, UnlearnConfig
from lightning_unlearn.mask import ParameterMask, head_parameter_scales, select_channels
from lightning_unlearn.repair import LearningRateGroups
from lightning_unlearn.reset import reestimate_batchnorm, reset_selected, selected_batchnorm_channels
from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.scoring.layers import LayerInfo

__all__ = ["RepairPlan", "ResetOutcome", "apply_reset", "exclude_frozen", "frozen_parameters", "plan_repair", "prepare"]


def prepare(
    model: nn.Module,
    scores: ChannelScores | Mapping[str, Tensor],
    config: UnlearnConfig,
    layers: Mapping[str, LayerInfo] | None = None,
) -> ParameterMask:
    """Select the channels to update from ``scores`` with a resolved ``config`` (``config.resolved(request)``).

    Layers the user froze (every parameter ``requires_grad=False``) are never selected, and no frozen parameter
    is marked trainable in the mask: unlearning leaves them exactly as they are. ``layers``: layer metadata
    (BatchNorm, head), taken from ``scores.layers`` when omitted.
    """
    if config.head_rows == "auto" or config.objective == "auto":
        raise ValueError("prepare() needs a resolved config: pass config.resolved(request, engine)")
    layers = layers if layers is not None else getattr(scores, "layers", None)
    modules = dict(model.named_modules())
    usable = {n: s for n, s in scores.items() if not _all_frozen(modules.get(n))}
    if not usable:
        raise ValueError(f"every scored layer is frozen (requires_grad=False): {sorted(scores)}; nothing to unlearn")
    mask = select_channels(usable, model, config.ratio, config.scope, config.threshold, config.include_head,
                           config.head_rows, layers=layers)
    return exclude_frozen(mask, model)


@dataclass
class ResetOutcome:
    """What :func:`apply_reset` did: elements changed, the BatchNorm channels whose statistics need
    estimating (name -> bool vector) and how many retain batches estimated them here (0: not here)."""

    changed: int = 0
    batchnorm_channels: dict[str, Tensor] = field(default_factory=dict)
    batchnorm_batches: int = 0


def apply_reset(
    model: nn.Module,
    mask: ParameterMask,
    config: UnlearnConfig,
    retain_batches: Iterable | None = None,
    max_batches: int = 20,
) -> ResetOutcome:
    """``config.reset`` on the selected slices (seeded with ``config.seed``; the global RNG is left alone), then
    the running statistics of the selected BatchNorm channels re-estimated on ``retain_batches`` (at most
    ``max_batches``). Without ``retain_batches`` (a federated server holds no data) the channels to estimate
    are returned for the engine to estimate where the data is. ``reset="none"`` changes nothing."""
    if config.reset == "none":
        return ResetOutcome()
    changed = reset_selected(model, mask, config.reset, config.seed)
    channels = selected_batchnorm_channels(model, mask)
    used = reestimate_batchnorm(model, mask, retain_batches, max_batches) if retain_batches is not None else 0
    return ResetOutcome(changed, channels, used)


@dataclass(frozen=True)
class RepairPlan:
    """How to repair: objective and its forget term, learning rates, budget and stopping checks."""

    objective: str
    forget_weight: float
    learning_rates: LearningRateGroups
    max_steps: int | None
    epochs: int | None
    check_every: int
    early_stopping: bool

    @property
    def forget_aware(self) -> bool:
        """The objective has a forget term: the module needs the mixin and combined batches."""
        return self.objective in FORGET_AWARE


def plan_repair(
    mask: ParameterMask,
    config: UnlearnConfig,
    layers: Mapping[str, LayerInfo],
    retain_batches: int | None = None,
) -> RepairPlan:
    """The repair for a resolved ``config``: the selected head rows get ``head_lr_scale`` (in their own
    parameter group) when it differs from ``lr_scale``; ``max_steps="auto"`` is sized by ``retain_batches``
    (retain batches per epoch)."""
    if config.objective == "auto" or config.head_lr_scale == "auto":
        raise ValueError("plan_repair() needs a resolved config: pass config.resolved(request, engine)")
    head = config.head_lr_scale if config.head_lr_scale is not None else config.lr_scale
    params = head_parameter_scales(mask, layers, head) if head != config.lr_scale else {}
    if config.max_steps == "auto" and retain_batches is None:
        raise ValueError("max_steps='auto' is sized by the retain data: pass retain_batches")
    budget = config.step_budget(retain_batches) if retain_batches is not None else config.max_steps
    return RepairPlan(config.objective, config.forget_weight, LearningRateGroups(config.lr_scale, params), budget,
                      config.epochs, config.check_interval(budget), config.early_stopping)


def frozen_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters the user froze (``requires_grad=False``)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _all_frozen(module: nn.Module | None) -> bool:
    params = list(module.parameters()) if module is not None else []
    return bool(params) and all(not p.requires_grad for p in params)


def exclude_frozen(mask: ParameterMask, model: nn.Module) -> ParameterMask:
    """``mask`` without the parameters the user froze (the same mask when nothing is frozen): a given or restored
    mask must not mark them trainable, nor let a reset touch them."""
    frozen = frozen_parameters(model)
    if not frozen or not any(bool(mask.masks[n].any()) for n in frozen if n in mask.masks):
        return mask
    masks = {n: (torch.zeros_like(m) if n in frozen else m) for n, m in mask.masks.items()}
    channels = {k: v for k, v in mask.channels.items() if f"{k}.weight" not in frozen}
    return ParameterMask(masks, channels)
