"""Privacy accounting helpers: the same numbers Opacus' own accountants give.

Epsilon depends only on the noise multiplier, the Poisson sampling rate ``q = 1 / len(loader)``,
the number of steps and delta; these helpers expose that so a budget can be planned (or
checked) before any training.
"""
from __future__ import annotations

import math

from lightning_unlearn.privacy._opacus import require_opacus

ACCOUNTANTS = ("rdp", "prv", "gdp")


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; allowed accountants are {list(ACCOUNTANTS)}")
    return accountant


def check_epsilon(target_epsilon: float) -> float:
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        target_epsilon > 0 and math.isfinite(target_epsilon)
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}; allowed: (0, inf)")
    return float(target_epsilon)


def check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r} (usually below 1 / number of training samples)")
    return float(delta)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float = 1e-5,
                accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` DP-SGD steps at ``sample_rate`` with ``noise_multiplier`` (Opacus' accountant)."""
    require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(check_accountant(accountant))
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(check_delta(delta)))


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float = 1e-5,
              accountant: str = "rdp", epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier that keeps ``steps`` steps at ``sample_rate`` within ``target_epsilon``."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate noise, got {steps}")
    return float(get_noise_multiplier(
        target_epsilon=check_epsilon(target_epsilon), target_delta=check_delta(delta), sample_rate=float(sample_rate),
        steps=int(steps), accountant=check_accountant(accountant), epsilon_tolerance=epsilon_tolerance,
    ))
