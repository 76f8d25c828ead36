"""The Flower components of this app: lightning-unlearn's ready-made ServerApp and ClientApp."""
from lightning_unlearn.federated.flower.app import clientapp, serverapp

__all__ = ["clientapp", "serverapp"]
