"""lightning-unlearn: make a trained Lightning model forget a class, a client or samples.

Explain the model (captum), select the channels most tied to the data to forget, and
fine-tune only those, with every other parameter left bit-for-bit unchanged.
"""
from lightning_unlearn.api import UnlearningResult, retrain, unlearn
from lightning_unlearn.attribution import METHODS, ChannelScores, channel_scores, discover_layers
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.masking import MaskEnforcer
from lightning_unlearn.mixin import UnlearningMixin
from lightning_unlearn.objectives import OBJECTIVES
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.selection import ParameterMask, select_channels

__version__ = "0.1.0"
__all__ = [
    "ChannelScores",
    "ForgetRequest",
    "MaskEnforcer",
    "METHODS",
    "OBJECTIVES",
    "ParameterMask",
    "UnlearningDataModule",
    "UnlearningMixin",
    "UnlearningResult",
    "channel_scores",
    "discover_layers",
    "retrain",
    "select_channels",
    "unlearn",
]
