"""Flower apps for the federated training and unlearning protocol (run them with ``flwr run`` or Flower's
``flwr.simulation.run_simulation``)."""
from lightning_unlearn.federated.flower.server_app import FedAvgPlan, FlowerRunResult, UnlearnPlan, make_server_app

__all__ = ["FedAvgPlan", "FlowerRunResult", "UnlearnPlan", "make_server_app"]
