"""UnlearningResult: what every unlearning method returns, central or federated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.mask import ParameterMask


@dataclass
class UnlearningResult:
    """What every unlearning method returns, central or federated: the model, its mask and the evidence.

    ``metrics`` holds forget / remaining / test accuracy where the engine can measure them
    (a federated server cannot: the simulation's oracle fills them in); ``timings_s`` the cost;
    ``config`` the resolved settings the run used.
    """

    model: nn.Module
    mask: ParameterMask | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    scores: ChannelScores | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    method: str = "selective"
    config: UnlearnConfig | None = None
