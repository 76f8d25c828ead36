"""Exact freezing of the unselected parameter elements, whatever the optimizer.

Zeroing gradients is not enough: weight decay, momentum and Adam's running moments move
weights whose gradient is zero. So the frozen elements are *written back* from a
reference copy after every optimizer step (``torch.where`` copies values bit for bit),
and BatchNorm layers stay in eval mode so no running statistic drifts.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_unlearn._modes import restore_modes
from lightning_unlearn.config import check_bn_stats
from lightning_unlearn.mask.parameter_mask import ParameterMask

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class MaskEnforcer:
    """Holds the reference values of frozen elements and puts them back.

    Args:
        bn_stats: ``"frozen"`` (default) keeps every BatchNorm in eval mode, so no running
            statistic changes; ``"selected"`` lets BatchNorm run in train mode and restores the
            running statistics of unselected channels after each step. Measured (DESIGN.md):
            frozen statistics keep remaining accuracy higher.
    """

    def __init__(self, model: nn.Module, mask: ParameterMask, bn_stats: str = "frozen") -> None:
        check_bn_stats(bn_stats)
        mask.check(model)
        self.model, self.mask, self.bn_stats = model, mask, bn_stats
        params = dict(model.named_parameters())
        self._frozen: list[tuple[Tensor, Tensor | None, Tensor]] = []  # (param, trainable mask or None, reference)
        for name, m in mask.masks.items():
            if bool(m.all()):
                continue
            p = params[name]
            keep = None if not bool(m.any()) else m.to(p.device)
            self._frozen.append((p, keep, p.detach().clone()))
        self._bn = [m for m in model.modules() if isinstance(m, BN_TYPES)]
        self._bn_modes = [(bn, bn.training) for bn in self._bn]  # given back by detach(): eval is for this fit only
        self._bn_frozen: list[tuple[Tensor, Tensor | None, Tensor]] = []
        if bn_stats == "selected":
            names = {m: n for n, m in model.named_modules()}
            for bn in self._bn:
                if bn.running_mean is None:
                    continue
                key = f"{names[bn]}.weight" if names[bn] else "weight"
                selected = mask.masks.get(key)
                keep = None if selected is None or not bool(selected.any()) else selected.to(bn.running_mean.device)
                for buf in (bn.running_mean, bn.running_var):
                    self._bn_frozen.append((buf, keep, buf.detach().clone()))
        self._handles: list = []

    # -- the three operations ------------------------------------------------------------
    @torch.no_grad()
    def zero_frozen_grads(self) -> None:
        """Cheap first line (keeps clipping norms about trainable weights only); restore() is the guarantee."""
        for p, keep, _ in self._frozen:
            if p.grad is not None:
                if keep is None:
                    p.grad.zero_()
                else:
                    p.grad.mul_(keep)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every frozen element back from the reference, bit for bit."""
        for t, keep, ref in self._frozen + self._bn_frozen:
            if keep is None:
                t.copy_(ref)
            else:
                torch.where(keep, t, ref, out=t)

    def freeze_batchnorm(self) -> None:
        """Put BatchNorm layers in eval mode (call after anything that sets ``model.train()``)."""
        if self.bn_stats == "frozen":
            for bn in self._bn:
                bn.eval()

    # -- wiring --------------------------------------------------------------------------
    def attach(self, optimizers: Iterable[Optimizer]) -> None:
        """Zero frozen gradients right before, and restore right after, every inner ``step()``.

        Wrappers are unwrapped to the torch optimizer that moves the weights, so the mask applies
        after whatever a wrapper did to the gradients (Opacus: per-sample clipping, then noise).
        """
        self.detach()
        for opt in optimizers:
            inner = getattr(opt, "optimizer", opt)  # LightningOptimizer -> torch optimizer
            inner = getattr(inner, "original_optimizer", inner)  # Opacus DPOptimizer -> torch optimizer
            self._handles.append(inner.register_step_pre_hook(lambda *_: self.zero_frozen_grads()))
            self._handles.append(inner.register_step_post_hook(lambda *_: self.restore()))

    def detach(self) -> None:
        """Remove the optimizer hooks and give BatchNorm layers back the mode they had: a model trained further
        afterwards (a federation's shared client model, a user's fine-tune) must not keep frozen statistics."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        restore_modes(self._bn_modes)


def frozen_elements_equal(model: nn.Module, reference: Mapping[str, Tensor], mask: ParameterMask) -> bool:
    """True iff every element outside ``mask`` equals ``reference`` exactly (``torch.equal``)."""
    for name, p in model.named_parameters():
        keep = mask.masks[name].to(p.device)
        ref = reference[name].to(p.device)
        if not torch.equal(p.detach()[~keep], ref[~keep]):
            return False
    return True
