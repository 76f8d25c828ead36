"""Small reference models used by the demo, tests, configs and benchmarks."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_unlearn.repair.mixin import UnlearningMixin

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class ClassifierModule(UnlearningMixin, pl.LightningModule):
    """An ordinary cross-entropy classifier: ``training_step`` takes ``(x, y)`` batches (extra fields ignored).

    The mixin only adds the forget-aware objectives; subclasses define the network.
    """

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]  # (input, label, *extra) items
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]  # (input, label, *extra) items
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y))

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """``lightning-unlearn test``: accuracy per test loader (an UnlearningDataModule gives forget / remaining)."""
        x, y = batch[0], batch[1]  # (input, label, *extra) items
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean(), batch_size=len(y))


class SmallCNN(ClassifierModule):
    """Two conv blocks (Conv-BN-ReLU) and two linear layers; works for 8x8 digits and 28x28 MNIST."""

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
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed are {list(OPTIMIZERS)}")
        self.save_hyperparameters()
        c1, c2 = channels
        self.conv1, self.bn1 = nn.Conv2d(in_channels, c1, 3, padding=1), self.norm_layer(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), self.norm_layer(c2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(c2 * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def norm_layer(self, num_channels: int) -> nn.Module:
        """The normalisation after each conv (``bn1``, ``bn2``); subclasses swap it (e.g. GroupNorm for DP-SGD)."""
        return nn.BatchNorm2d(num_channels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (input of the classifier head)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))

    def configure_optimizers(self):
        opt = OPTIMIZERS[self.hparams.optimizer]
        return opt(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class ResNet18Classifier(ClassifierModule):
    """torchvision's ResNet-18 with a 3x3 stem for 32x32 images (CIFAR-10); needs the ``vision`` extra."""

    def __init__(self, num_classes: int = 10, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 max_epochs: int = 30) -> None:
        super().__init__()
        try:
            from torchvision.models import resnet18
        except ImportError as err:
            raise ImportError("ResNet18Classifier needs torchvision: pip install 'lightning-unlearn[vision]'") from err
        self.save_hyperparameters()
        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.net.maxpool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=h.max_epochs)]
