"""Channel scores: which output channels of which layer carry the data to forget.

One class per method behind one interface (:class:`ChannelScorer`, captum-backed), their registry,
layer discovery, and :func:`channel_scores`, which streams a loader through a scorer.
``SCORING_METHODS`` (the registry's names) and ``DEFAULT_MAX_SAMPLES`` are derived from
``SCORERS`` on access, so a method added with :func:`register_scorer` appears in both.
"""
from typing import Any

from lightning_unlearn.scoring.base import ChannelScorer, channels_first, register_scorer, registry_views
from lightning_unlearn.scoring.channels import channel_scores
from lightning_unlearn.scoring.layers import discover_layers
from lightning_unlearn.scoring.methods import Ablation, Conductance, GradCam, GradientXActivation, WeightSaliency


def __getattr__(name: str) -> Any:
    views = registry_views()
    if name in views:
        return views[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Ablation", "ChannelScorer", "Conductance", "GradCam", "GradientXActivation", "SCORING_METHODS", "WeightSaliency",
    "channel_scores", "channels_first", "discover_layers", "register_scorer",
]
