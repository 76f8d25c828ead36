"""Data: forget/retain splits, federated partitions and dataset readers."""
from lightning_unlearn.data.datasets import load_digits_datasets, load_mnist
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.data.unlearning import UnlearningDataModule

__all__ = ["FederatedDataModule", "UnlearningDataModule", "load_digits_datasets", "load_mnist"]
