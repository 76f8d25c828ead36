"""The two controls that tell whether explanation-based selection matters.

``output_row``: only the forgotten classes' rows of the classifier head are trainable. It
already drives forget accuracy to zero on MNIST, so it is the bar the feature-level evidence
(probe, MIA, relearn time) must beat. ``random_channels``: as many channels per layer as the
core method selects, but chosen at random (same head rows), so any difference to the core
method is due to the explanation.
"""
from __future__ import annotations

import torch

from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.baselines.common import forget_rows, head_name, layer_info, masked_update
from lightning_unlearn.mask import ParameterMask, select_channels


def output_row_mask(model, dm) -> ParameterMask:
    """Mask with only the head rows of the forgotten classes (the whole head for sample requests)."""
    layers = layer_info(model, dm)
    return ParameterMask.from_channels(model, {head_name(layers): forget_rows(dm, layers)}, layers)


def random_channel_mask(model, dm, ratio: float = 0.1, seed: int = 0) -> ParameterMask:
    """``ratio`` of the channels of every non-head layer at random (seeded), plus the core method's head rows."""
    layers = layer_info(model, dm)
    gen = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(info.out_channels, generator=gen) for name, info in layers.items()}
    rows = list(dm.request.classes) or None
    return select_channels(scores, model, ratio, "layer", layers=layers, head_rows=rows)


def output_row(model, dm, epochs: int = 1, seed: int = 0, trainer_kwargs=None, objective: str = "random_label") -> UnlearningResult:
    return masked_update(model, dm, output_row_mask(model, dm), objective, epochs, seed, trainer_kwargs)


def random_channels(
    model, dm, epochs: int = 1, seed: int = 0, trainer_kwargs=None, ratio: float = 0.1, objective: str = "random_label"
) -> UnlearningResult:
    return masked_update(model, dm, random_channel_mask(model, dm, ratio, seed), objective, epochs, seed, trainer_kwargs)
