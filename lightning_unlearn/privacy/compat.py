"""Make a model trainable by Opacus, in place, and say what changed.

Opacus needs per-sample gradients, so layers that mix samples (BatchNorm) or that it cannot
differentiate per sample (stock LSTM/GRU/MultiheadAttention) are swapped for private
equivalents (GroupNorm, DPLSTM, ...). The swap is done *in place* because a Lightning Trainer
already holds the module: ``ModuleValidator.fix`` returns a copy, which the Trainer would never see.
"""
from __future__ import annotations

from torch import nn

from lightning_unlearn.privacy._opacus import require_opacus


class UnsupportedModelError(ValueError):
    """The model holds layers that Opacus cannot train privately and ``ModuleValidator.fix`` cannot replace."""


def dp_compatibility_errors(model: nn.Module) -> list[str]:
    """Why Opacus would refuse ``model`` (empty list: it can be trained with DP-SGD as is)."""
    require_opacus()
    from opacus.grad_sample import GradSampleModule
    from opacus.validators import ModuleValidator

    errors = list(ModuleValidator.validate(model, strict=False)) + list(GradSampleModule.validate(model, strict=False))
    return [_first_sentence(e) for e in errors]


def make_dp_compatible(model: nn.Module) -> list[str]:
    """Replace, in place, every submodule Opacus has a fixer for; return ``"name: Old -> New"`` per swap.

    Raises:
        UnsupportedModelError: layers remain that Opacus cannot handle (named in the message).
    """
    require_opacus()
    from opacus.validators import ModuleValidator

    replaced = []
    for name, module in list(model.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(module))
        if not name or fixer is None:
            continue
        new = fixer(module)
        reference = next(iter(module.parameters()), None)
        if reference is None:
            reference = next(iter(module.buffers()), None)
        if reference is not None:
            new = new.to(reference.device)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        replaced.append(f"{name}: {type(module).__name__} -> {type(new).__name__}")
    errors = dp_compatibility_errors(model)
    if errors:
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be trained with DP-SGD, and ModuleValidator.fix has no replacement for: "
            + "; ".join(errors)
            + ". Allowed: layers without buffers that Opacus computes per-sample gradients for "
            "(Linear, Conv, GroupNorm/LayerNorm, Embedding, DPLSTM, ...)"
        )
    return replaced


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().replace("\n", " ")
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


def is_dp_compatible(model: nn.Module) -> bool:
    return not dp_compatibility_errors(model)


__all__ = ["UnsupportedModelError", "dp_compatibility_errors", "is_dp_compatible", "make_dp_compatible"]
