"""Reference models born DP-compatible, so DP-trained checkpoints load from a config."""
from __future__ import annotations

from torch import nn

from lightning_unlearn.models import SmallCNN


def group_norm_for(num_channels: int) -> nn.GroupNorm:
    """Opacus' BatchNorm replacement (``ModuleValidator.fix``): GroupNorm with min(32, C) groups."""
    return nn.GroupNorm(min(32, num_channels), num_channels, affine=True)


class DPSmallCNN(SmallCNN):
    """The :class:`~lightning_unlearn.models.SmallCNN` with GroupNorm where it has BatchNorm.

    Exactly what :func:`make_dp_compatible` turns a SmallCNN into, but built that way: a checkpoint
    trained with DP-SGD then loads into the model a config names (``lightning-unlearn unlearn`` /
    ``evaluate``), and reading it needs no Opacus.
    """

    def norm_layer(self, num_channels: int) -> nn.Module:
        return group_norm_for(num_channels)
