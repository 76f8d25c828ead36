"""Federated learning and unlearning, simulated in one process.

The server (:mod:`.server`) only ever sees the messages of :mod:`.messages` (wire-level, not part
of the public API): model arrays, updates, selected slices and per-channel score vectors with
sample counts. Clients (:mod:`.client`, :func:`make_clients`) train with Lightning on their own
shard. :func:`federated_unlearn` is the method, :func:`federated_retrain` the exact reference;
:mod:`.baselines` holds the other comparisons; :class:`FederatedSimulation` ties it together.
"""
from lightning_unlearn.federated.baselines import federated_retrain
from lightning_unlearn.federated.client import make_clients
from lightning_unlearn.federated.protocol import federated_unlearn
from lightning_unlearn.federated.server import run_fedavg
from lightning_unlearn.federated.simulation import FederatedSimulation

__all__ = ["FederatedSimulation", "federated_retrain", "federated_unlearn", "make_clients", "run_fedavg"]
