"""Reference models born DP-compatible, so DP-trained checkpoints load from a config."""
from __future__ import annotations

from torch import nn

from lightning_unlearn.models import SmallCNN


def group_norm_for(num_channels: int) -> nn.GroupNorm:
    """Opacus' BatchNorm replacement (``ModuleValidator.fix``): GroupNorm with min(32, C) groups."""
    return nn.GroupNorm(min(32, num_channels), num_channels, affine=True)


class DPSmallCNN(SmallCNN):
    """:class:`~lightning_unlearn.models.SmallCNN` with GroupNorm where it has BatchNorm.

    Exactly what :func:`make_dp_compatible` turns a SmallCNN into, but built that way: a checkpoint
    trained with DP-SGD then loads into the model a config names (``lightning-unlearn unlearn`` /
    ``evaluate``), and reading it needs no Opacus.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes, channels, hidden, lr, optimizer, weight_decay)
        self.bn1, self.bn2 = group_norm_for(channels[0]), group_norm_for(channels[1])
