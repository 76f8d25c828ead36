"""Drop-in Lightning callbacks."""
from lightning_unlearn.callbacks.gradient_mask import GradientMask
from lightning_unlearn.callbacks.selective import SelectiveUnlearning

__all__ = ["GradientMask", "SelectiveUnlearning"]
