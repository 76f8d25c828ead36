"""Data: forget/retain splits, federated partitions and dataset readers."""
from lightning_unlearn.data.datasets import dataset_targets, load_digits_datasets, load_mnist
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.data.federated import FederatedDataModule  # noqa: E402

__all__ = ["FederatedDataModule", "UnlearningDataModule", "dataset_targets", "load_digits_datasets", "load_mnist"]
