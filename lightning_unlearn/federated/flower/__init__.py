"""Flower apps for the federated training and unlearning protocol (extra ``flower``).

The ``ClientApp`` (:func:`make_client_app`) answers Flower messages by calling the same
:class:`~lightning_unlearn.federated.client.FederatedClient` handlers as the in-process
simulation; the ``ServerApp`` (:func:`make_server_app`) runs FedAvg and the unlearning rounds
with strategies built on the same aggregation functions and the shared orchestration
(:func:`~lightning_unlearn.federated.server.fedavg_aggregate`,
:func:`~lightning_unlearn.federated.server.aggregate_scores`,
:func:`~lightning_unlearn.orchestration.prepare`, :func:`~lightning_unlearn.orchestration.apply_reset`,
:func:`~lightning_unlearn.federated.server.masked_aggregate`). Every client message is
rebuilt into the library's own message dataclasses on the server, so the data-stays-home
checks run on Flower traffic too.
"""
from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install "lightning-unlearn[flower]"'


def require_flwr(feature: str = "the Flower apps") -> None:
    """Fail with the install command when flwr is missing (it is an optional extra)."""
    try:
        import flwr  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{feature} requires the Flower extra (flwr is not installed): {INSTALL_HINT}") from err


def require_ray() -> None:
    """Flower's simulation engine runs clients on Ray (``flwr[simulation]``, part of the extra)."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError(f"Flower simulation needs Ray (flwr[simulation]), which is not installed: {INSTALL_HINT}")


require_flwr("lightning_unlearn.federated.flower")

from lightning_unlearn.federated.flower.client_app import FederatedPartitions, make_client_app  # noqa: E402
from lightning_unlearn.federated.flower.ray_engine import run_flower_simulation  # noqa: E402
from lightning_unlearn.federated.flower.server_app import (  # noqa: E402
    FedAvgPlan,
    FlowerRunResult,
    UnlearnPlan,
    make_server_app,
)

__all__ = [
    "FedAvgPlan",
    "FederatedPartitions",
    "FlowerRunResult",
    "UnlearnPlan",
    "make_client_app",
    "make_server_app",
    "run_flower_simulation",
]
