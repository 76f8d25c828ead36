"""Config-friendly data modules (digits, MNIST): the request is given as plain arguments.

LightningCLI builds these from YAML. ``lightning-unlearn fit`` trains the original model on
``full_train_dataloader()`` (every sample); unlearning and retraining use the retain data.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn.data.datasets import load_digits_datasets, load_mnist
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.request import ForgetRequest, random_samples_request

def build_request(
    num_train: int,
    forget_classes: list[int] | None = None,
    forget_sample_ids: list[int] | None = None,
    forget_random_fraction: float | None = None,
    seed: int = 0,
) -> ForgetRequest:
    """A ForgetRequest from config fields: classes, explicit sample ids, or a seeded random fraction."""
    _one_request_field(forget_classes=forget_classes, forget_sample_ids=forget_sample_ids,
                       forget_random_fraction=forget_random_fraction)
    if forget_random_fraction is not None:
        return random_samples_request(num_train, fraction=forget_random_fraction, seed=seed)
    return ForgetRequest(classes=forget_classes, sample_ids=forget_sample_ids)


def _one_request_field(**fields: Any) -> None:
    """Exactly one request field set (a config's ``null`` or ``[]`` is unset): one line with the values if not."""
    given = {k: v for k, v in fields.items() if v is not None and not (isinstance(v, (list, tuple)) and not v)}
    if len(given) == 1:
        return
    names = ", ".join(fields)
    if given:
        raise ValueError(f"give only one of {names}; got " + ", ".join(f"{k}={v!r}" for k, v in given.items()))
    raise ValueError(f"no forget request: set one of {names}; got " + ", ".join(f"{k}={v!r}" for k, v in fields.items()))


class _PresetData(UnlearningDataModule, ABC):
    """The request and loader arguments every preset shares; a preset adds where its data come from.

    Args:
        forget_classes: classes to forget, e.g. ``[3]``.
        forget_sample_ids: training-set indices to forget.
        forget_random_fraction: forget this fraction of training samples, chosen with ``seed``.
    """

    def __init__(
        self,
        forget_classes: list[int] | None = None,
        forget_sample_ids: list[int] | None = None,
        forget_random_fraction: float | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        train, test = self._load(seed)
        request = build_request(len(train), forget_classes, forget_sample_ids, forget_random_fraction, seed)
        super().__init__(train, test, request, batch_size=batch_size, num_workers=num_workers, seed=seed)

    @abstractmethod
    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        """(train, test) datasets of the preset."""

    def val_dataloader(self) -> DataLoader:
        return self.full_test_dataloader()


class DigitsData(_PresetData):
    """scikit-learn's bundled 8x8 digits (embedded, no download) with a forget request.

    Args:
        test_size: fraction of the digits held out for testing (split with ``seed``).
    """

    def __init__(self, test_size: float = 0.25, **kwargs: Any) -> None:
        self.test_size = test_size
        super().__init__(**kwargs)

    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        return load_digits_datasets(test_size=self.test_size, seed=seed)


class MNISTData(_PresetData):
    """MNIST read from local idx files under ``root`` (never downloaded) with a forget request.

    Args:
        root: folder holding ``train-images-idx3-ubyte.gz`` etc. (or ``root/MNIST/raw``).
    """

    def __init__(self, root: str | None = None, batch_size: int = 128, **kwargs: Any) -> None:
        self.root = _required_root(root, "MNIST")
        super().__init__(batch_size=batch_size, **kwargs)

    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        return load_mnist(self.root)


class CIFAR10Data(_PresetData):
    """CIFAR-10 through torchvision (``vision`` extra) from ``root``; ``download=True`` fetches it (needs internet).

    Training images get random crops and flips; all images are normalised with the CIFAR-10 statistics.
    """

    def __init__(self, root: str | None = None, download: bool = False, batch_size: int = 128, num_workers: int = 4,
                 **kwargs: Any) -> None:
        self.root, self.download = _required_root(root, "CIFAR-10"), download
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)

    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        try:
            from torchvision import datasets, transforms as T
        except ImportError as err:
            raise ImportError("CIFAR10Data needs torchvision: pip install 'lightning-unlearn[vision]'") from err
        norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        train = datasets.CIFAR10(self.root, train=True, download=self.download, transform=augment)
        test = datasets.CIFAR10(self.root, train=False, download=self.download, transform=T.Compose([T.ToTensor(), norm]))
        return train, test


def _federated_request(num_train, forget_classes, forget_clients, forget_sample_ids, forget_random_fraction, seed):
    _one_request_field(forget_classes=forget_classes, forget_clients=forget_clients,
                       forget_sample_ids=forget_sample_ids, forget_random_fraction=forget_random_fraction)
    if forget_clients:
        return ForgetRequest(clients=forget_clients)
    return build_request(num_train, forget_classes, forget_sample_ids, forget_random_fraction, seed)


class _FederatedPreset(FederatedDataModule, ABC):
    """The partition and request arguments every federated preset shares; a preset adds where its data come from.

    Args:
        forget_clients: client ids leaving the federation (a client-level request).
    """

    def __init__(
        self,
        num_clients: int = 10,
        partition: str = "dirichlet",
        alpha: float = 0.5,
        classes_per_client: int = 2,
        forget_classes: list[int] | None = None,
        forget_clients: list[int] | None = None,
        forget_sample_ids: list[int] | None = None,
        forget_random_fraction: float | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        train, test = self._load(seed)
        super().__init__(train, test, num_clients=num_clients, partition=partition, alpha=alpha, seed=seed,
                         batch_size=batch_size, classes_per_client=classes_per_client)
        self.request = _federated_request(len(train), forget_classes, forget_clients, forget_sample_ids,
                                          forget_random_fraction, seed)

    @abstractmethod
    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        """(train, test) datasets of the preset."""


class FederatedDigitsData(_FederatedPreset):
    """Digits split across ``num_clients`` clients, with the deletion request to serve (config-friendly)."""

    def __init__(self, num_clients: int = 5, batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(num_clients=num_clients, batch_size=batch_size, **kwargs)

    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        return load_digits_datasets(seed=seed)


class FederatedMNISTData(_FederatedPreset):
    """MNIST from a local copy (``root``) split across clients, with the deletion request to serve."""

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        self.root = _required_root(root, "MNIST")
        super().__init__(**kwargs)

    def _load(self, seed: int) -> tuple[Dataset, Dataset]:
        return load_mnist(self.root)


def datasets_of(datamodule: LightningDataModule) -> tuple[Dataset, Dataset]:
    """(train, test) datasets of any data module a config names: its attributes, else its loaders' after ``setup``.

    The ``requests`` and ``sisa`` command groups train outside the data module's loaders, on its datasets.
    """
    train, test = getattr(datamodule, "train_dataset", None), getattr(datamodule, "test_dataset", None)
    if train is not None and test is not None:
        return train, test
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    return datamodule.train_dataloader().dataset, (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset


def _required_root(root: str | None, name: str) -> str:
    if not root:
        raise ValueError(
            f"{name} needs a data root: set data.init_args.root in the config or pass "
            "--data.root=/path/to/data (the folder with the dataset files)"
        )
    return root
