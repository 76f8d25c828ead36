"""Federated learning and unlearning: one protocol on Flower's Message API, in process and deployed."""
from lightning_unlearn.federated.baselines import federated_retrain
from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.fedavg import run_fedavg
from lightning_unlearn.federated.partitions import FederatedPartitions
from lightning_unlearn.federated.protocol import federated_unlearn
from lightning_unlearn.federated.simulation import FederatedSimulation, make_clients

__all__ = ["FederatedPartitions", "FederatedSimulation", "federated_retrain", "federated_unlearn", "make_client_app",
           "make_clients", "run_fedavg"]
