"""Federated learning and unlearning: one protocol on Flower's Message API, in process and deployed.

The server (:mod:`.fedavg`, :mod:`.protocol`, driven through a :class:`.federation.Federation` on any Flower
``Grid``) only ever sees the messages of :mod:`.messages`: model arrays, updates, selected slices and
per-channel score vectors with sample counts. The clients are one ``ClientApp`` (:mod:`.client`) that trains
with Lightning on each node's own shard; in process its nodes sit on a :class:`.grid.LocalGrid`
(:class:`FederatedSimulation`), deployed on Flower SuperNodes (:mod:`.flower`). :func:`federated_unlearn` is
the method, :func:`federated_retrain` the exact reference; :mod:`.baselines` holds the other comparisons.
"""
from lightning_unlearn.federated.baselines import federated_retrain
from lightning_unlearn.federated.client import make_client_app
from lightning_unlearn.federated.fedavg import run_fedavg
from lightning_unlearn.federated.partitions import FederatedPartitions
from lightning_unlearn.federated.protocol import federated_unlearn
from lightning_unlearn.federated.simulation import FederatedSimulation, make_clients

__all__ = ["FederatedPartitions", "FederatedSimulation", "federated_retrain", "federated_unlearn", "make_client_app",
           "make_clients", "run_fedavg"]
