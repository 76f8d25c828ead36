"""Flower apps for the federated training and unlearning protocol (extra ``flower`` for the simulation engine)."""
from lightning_unlearn.federated.flower.ray_engine import run_flower_simulation
from lightning_unlearn.federated.flower.server_app import FedAvgPlan, FlowerRunResult, UnlearnPlan, make_server_app

__all__ = ["FedAvgPlan", "FlowerRunResult", "UnlearnPlan", "make_server_app", "run_flower_simulation"]
