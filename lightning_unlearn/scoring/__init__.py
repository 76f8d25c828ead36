"""Channel-scoring methods: one class per method behind one interface, and their registry.

``SCORING_METHODS`` (the registry's names) and ``DEFAULT_MAX_SAMPLES`` are derived from
``SCORERS`` on access, so a method added with :func:`register_scorer` appears in both.
"""
from typing import Any

from lightning_unlearn.scoring import methods
from lightning_unlearn.scoring.base import SCORERS, ChannelScorer, check_method, register_scorer, registry_views


def __getattr__(name: str) -> Any:
    views = registry_views()
    if name in views:
        return views[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_MAX_SAMPLES", "SCORERS", "SCORING_METHODS", "ChannelScorer", "check_method", "methods", "register_scorer"]
