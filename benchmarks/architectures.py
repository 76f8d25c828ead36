"""Four classifiers for 1-channel images (8x8 digits, 28x28 MNIST) for the forgetting benchmarks.

Each subclasses :class:`lightning_unlearn.models.ClassifierModule` (the UnlearningMixin and a cross-entropy
``training_step``), so the library scores, selects, resets and repairs them without any model-specific code:

- ``SmallCNN``: the library's reference model (2 conv + BatchNorm, 2 linear; Adam).
- ``ResNetBN``: a small residual network (conv stem + BatchNorm, three BasicBlocks with identity / 1x1
  skips, global average pool, linear head); AdamW with a per-epoch cosine schedule.
- ``MLP``: flatten, two hidden ReLU layers, head; SGD with momentum.
- ``ResNet18``: torchvision's ResNet-18 layout (BasicBlock [2, 2, 2, 2], 64-128-256-512 channels) with a
  3x3 stride-1 one-channel stem and no max-pool, written here because torchvision's wheel does not load on
  the benchmark machines; SGD momentum 0.9 with weight decay and a per-epoch cosine schedule.

``ARCHITECTURES`` maps each name to a factory ``(num_classes, image_size) -> module``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_unlearn.models import ClassifierModule, SmallCNN


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers with a skip: identity, or a 1x1 Conv-BN when the shape changes (ResNet's BasicBlock)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResidualClassifier(ClassifierModule):
    """Stem (3x3 conv + BatchNorm) -> stages of BasicBlocks -> global average pool -> linear head."""

    def __init__(self, stages: list[tuple[int, int, int]], stem_channels: int, in_channels: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem_channels)
        blocks, channels = [], stem_channels
        for out_channels, count, stride in stages:
            for i in range(count):
                blocks.append(BasicBlock(channels, out_channels, stride if i == 0 else 1))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (input of the classifier head)."""
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def _cosine(self, optimizer: torch.optim.Optimizer):
        """Per-epoch cosine decay over ``max_epochs`` (the training run's length)."""
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.hparams.max_epochs))
        return [optimizer], [{"scheduler": scheduler, "interval": "epoch"}]


class ResNetBN(_ResidualClassifier):
    """A small residual BatchNorm network: 16-channel stem, blocks 16 -> 32 (stride 2) -> 64 (stride 2)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, lr: float = 1e-3,
                 weight_decay: float = 5e-4, max_epochs: int = 20) -> None:
        stages = [(width, 1, 1), (2 * width, 1, 2), (4 * width, 1, 2)]
        super().__init__(stages, width, in_channels, num_classes)
        self.save_hyperparameters()

    def configure_optimizers(self):
        h = self.hparams
        return self._cosine(torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay))


class ResNet18(_ResidualClassifier):
    """torchvision's ResNet-18 layout for one-channel images: 3x3 stride-1 stem, no max-pool, [2, 2, 2, 2] blocks."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, lr: float = 1e-3, weight_decay: float = 5e-4,
                 max_epochs: int = 20) -> None:
        stages = [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)]
        super().__init__(stages, 64, in_channels, num_classes)
        self.save_hyperparameters()

    def configure_optimizers(self):
        h = self.hparams
        return self._cosine(torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay))


class MLP(ClassifierModule):
    """Flatten -> Linear-ReLU -> Linear-ReLU -> head; the input size is fixed by ``image_size``."""

    def __init__(self, image_size: int = 8, in_channels: int = 1, num_classes: int = 10,
                 hidden: tuple[int, int] = (256, 128), lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_channels * image_size * image_size, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.head = nn.Linear(h2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum)


#: name -> factory(num_classes, image_size, epochs): epochs sets the cosine schedules' length.
ARCHITECTURES: dict[str, Callable[..., ClassifierModule]] = {
    "SmallCNN": lambda num_classes=10, image_size=8, epochs=20: SmallCNN(num_classes=num_classes),
    "ResNetBN": lambda num_classes=10, image_size=8, epochs=20: ResNetBN(num_classes=num_classes, max_epochs=epochs),
    "MLP": lambda num_classes=10, image_size=8, epochs=20: MLP(image_size=image_size, num_classes=num_classes),
    "ResNet18": lambda num_classes=10, image_size=8, epochs=20: ResNet18(num_classes=num_classes, max_epochs=epochs),
}


def build(name: str, num_classes: int = 10, image_size: int = 8, epochs: int = 20) -> ClassifierModule:
    """A fresh ``name`` model; unknown names fail with the list of architectures."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; allowed architectures are {list(ARCHITECTURES)}")
    return ARCHITECTURES[name](num_classes=num_classes, image_size=image_size, epochs=epochs)
