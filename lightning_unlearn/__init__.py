"""lightning-unlearn: make a trained Lightning model forget a class, a client or samples.

Explain the model (captum), select the channels most tied to the data to forget, and
update only those, with every other parameter left bit-for-bit unchanged.
"""
from typing import Any

from lightning_unlearn.api import retrain, unlearn
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.mask import MaskEnforcer, ParameterMask, select_channels
from lightning_unlearn.repair import OBJECTIVES, UnlearningMixin
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.scoring import ChannelScorer, ChannelScores, LayerInfo, channel_scores, discover_layers

__version__ = "0.1.0"
__all__ = [
    "ChannelScorer",
    "ChannelScores",
    "ForgetRequest",
    "LayerInfo",
    "MaskEnforcer",
    "OBJECTIVES",
    "ParameterMask",
    "SCORING_METHODS",
    "UnlearnConfig",
    "UnlearningDataModule",
    "UnlearningMixin",
    "UnlearningResult",
    "channel_scores",
    "discover_layers",
    "retrain",
    "select_channels",
    "unlearn",
]


def __getattr__(name: str) -> Any:
    """``SCORING_METHODS`` follows the scorer registry (user-registered methods included)."""
    if name == "SCORING_METHODS":
        from lightning_unlearn import scoring

        return scoring.SCORING_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
