"""Federated learning and unlearning, simulated in one process.

The server (:mod:`.server`) only ever sees the messages of :mod:`.messages`: model arrays,
updates, selected slices and per-channel score vectors with sample counts. Clients
(:mod:`.client`) train with Lightning on their own shard. :func:`federated_unlearn` is the
method; :mod:`.baselines` holds the comparisons; :class:`FederatedSimulation` ties it together.
"""
from lightning_unlearn.federated.arrays import get_arrays, set_arrays
from lightning_unlearn.federated.client import FederatedClient, local_fit, make_clients
from lightning_unlearn.federated.messages import (
    BatchNormStatsMessage,
    Broadcast,
    MaskedUpdateMessage,
    ParametersMessage,
    ScoresMessage,
    Transport,
)
from lightning_unlearn.federated.protocol import FederatedUnlearningResult, federated_unlearn, masked_rounds
from lightning_unlearn.federated.server import (
    FedAvgResult,
    aggregate_scores,
    fedavg_aggregate,
    masked_aggregate,
    run_fedavg,
)
from lightning_unlearn.federated.simulation import FederatedSimulation, write_json

__all__ = [
    "BatchNormStatsMessage",
    "Broadcast",
    "FedAvgResult",
    "FederatedClient",
    "FederatedSimulation",
    "FederatedUnlearningResult",
    "MaskedUpdateMessage",
    "ParametersMessage",
    "ScoresMessage",
    "Transport",
    "aggregate_scores",
    "fedavg_aggregate",
    "federated_unlearn",
    "get_arrays",
    "local_fit",
    "make_clients",
    "masked_aggregate",
    "masked_rounds",
    "run_fedavg",
    "set_arrays",
]
