"""Flower apps for the federated training and unlearning protocol (extra ``flower``)."""
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

from lightning_unlearn.federated.flower.ray_engine import run_flower_simulation  # noqa: E402
from lightning_unlearn.federated.flower.server_app import (  # noqa: E402
    FedAvgPlan,
    FlowerRunResult,
    UnlearnPlan,
    make_server_app,
)

__all__ = [
    "FedAvgPlan",
    "FlowerRunResult",
    "UnlearnPlan",
    "make_server_app",
    "run_flower_simulation",
]
