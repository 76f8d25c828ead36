"""A small-population U-LiRA verdict for one request: can an auditor tell the unlearned model from retraining?

U-LiRA needs populations: K originals (each unlearned) and K models retrained without the forget set. The
models a caller already has (one original, its unlearned copy, one retrained model) are member 0; the other
K - 1 of each are trained here with the original's schedule. That is 2 (K - 1) trainings, so the cost is
estimated first from the caller's own timings and the verdict is skipped above a limit (:func:`verdict_cost`).

Both views of the attack are reported: *raw* on each forget sample's ``phi = logit_y - logsumexp(others)``,
and *class-calibrated* on ``phi`` minus the same model's mean ``phi`` on held-out test samples of the sample's
class (what is left once the model's overall confidence on that class is taken out). At small K the AUC is
noisy: the verdict carries the range of the per-pair AUCs (each held-out unlearned/retrained pair scored on
its own) measured in the same run and, from K = 6 on, the attack's own floor: two halves of the retrained
population scored against each other (0.5 in expectation).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Subset

from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence.attacks import population_statistics, roc_result, ulira_scores
from lightning_unlearn.evidence.references import _train_fresh, derived_seed

log = logging.getLogger(__name__)

#: Below this raw and class-calibrated AUC the verdict reads "indistinguishable at this K".
CLOSE_AUC = 0.6
#: From this AUC on, "an auditor tells it from retraining".
TELLS_AUC = 0.8


def verdict_cost(k: int, retrain_s: float, unlearn_s: float) -> float:
    """Seconds the verdict will take: K - 1 more originals and retrained models (each as long as one
    retraining) and K - 1 more unlearning runs; scoring the models is small next to training them."""
    return (k - 1) * (2 * retrain_s + unlearn_s)


def class_calibrated(phi_forget: np.ndarray, forget_labels: np.ndarray, phi_heldout: np.ndarray,
                     heldout_labels: np.ndarray) -> np.ndarray:
    """Each forget sample's phi minus the same model's mean phi on held-out samples of its class.

    Shapes (models, N_forget), (models, N_heldout) -> (models, N_forget).
    """
    out = np.empty_like(phi_forget)
    for c in np.unique(forget_labels):
        held = heldout_labels == c
        if not held.any():
            raise ValueError(f"no held-out samples of class {int(c)} to calibrate against")
        rows = forget_labels == c
        out[:, rows] = phi_forget[:, rows] - phi_heldout[:, held].mean(1, keepdims=True)
    return out


def _auc(unlearned: np.ndarray, retrained: np.ndarray) -> tuple[float, list[float]]:
    """Leave-one-out U-LiRA AUC over all held-out pairs, and each pair's own AUC."""
    pos, neg = ulira_scores(unlearned, retrained)
    return roc_result(pos.ravel(), neg.ravel()).auc, [roc_result(p, n).auc for p, n in zip(pos, neg)]


def halves_auc(population: np.ndarray, splits: int = 10, seed: int = 0) -> float | None:
    """Mean U-LiRA AUC of random half/half splits of ONE population: the attack's own floor at K/2 per side
    (0.5 in expectation); None below 3 models per half."""
    half = len(population) // 2
    if half < 3:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(splits):
        order = rng.permutation(len(population))
        aucs.append(_auc(population[order[:half]], population[order[half:2 * half]])[0])
    return float(np.mean(aucs))


@dataclass(frozen=True)
class Verdict:
    """U-LiRA AUCs (0.5 = indistinguishable from retraining, 1 = every model recognised) at population size ``k``."""

    k: int
    unlearned_raw: float
    unlearned_cal: float
    original_raw: float
    original_cal: float
    pair_range: tuple[float, float]  # raw AUC of single held-out pairs: how much one model changes the answer
    seconds: float
    halves_raw: float | None = None  # two halves of the retrained population (K >= 6): the floor at this K
    halves_cal: float | None = None

    @property
    def words(self) -> str:
        worst = max(self.unlearned_raw, self.unlearned_cal)
        if worst <= CLOSE_AUC:
            return "indistinguishable from retraining at this K"
        if worst >= TELLS_AUC:
            return "an auditor tells it from retraining"
        return "partly distinguishable from retraining"

    def line(self) -> str:
        lo, hi = self.pair_range
        floor = "" if self.halves_raw is None else (
            f", two halves of the retrained population {self.halves_raw:.2f} / {self.halves_cal:.2f}")
        return (f"attack verdict (U-LiRA, K={self.k} originals / unlearned / retrained, {self.seconds:.0f}s): "
                f"unlearned vs retrained AUC {self.unlearned_raw:.2f} raw / {self.unlearned_cal:.2f} class-calibrated, "
                f"original {self.original_raw:.2f} / {self.original_cal:.2f}{floor} (0.5 = indistinguishable, "
                f"1 = always told apart): {self.words}. Noisy at K={self.k}: one model pair alone scores "
                f"{lo:.2f}-{hi:.2f}")

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "unlearned_raw": self.unlearned_raw, "unlearned_cal": self.unlearned_cal,
                "original_raw": self.original_raw, "original_cal": self.original_cal,
                "pair_range": list(self.pair_range), "halves_raw": self.halves_raw, "halves_cal": self.halves_cal,
                "seconds": self.seconds, "words": self.words}


def population_verdict(
    original: pl.LightningModule,
    unlearned: nn.Module,
    retrained: nn.Module,
    datamodule: UnlearningDataModule,
    epochs: int,
    unlearn_fn,
    k: int = 4,
    seed: int = 0,
) -> Verdict:
    """U-LiRA of ``unlearn_fn`` against retraining with K models per population (the given ones are member 0).

    ``epochs``: the original's schedule (originals and retrained members train for it).
    ``unlearn_fn(original) -> model``: the unlearning a user runs (the same settings as ``unlearned``'s).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 3:
        raise ValueError(f"the attack's population size must be an integer >= 3 (leave-one-out keeps 2), got {k!r}")
    start = time.perf_counter()
    dm = datamodule
    template = copy.deepcopy(original).cpu()
    originals, unlearned_pop, retrained_pop = [original], [unlearned], [retrained]
    for i in range(1, k):
        member = _train_fresh(template, dm.train_dataset, dm, epochs, None, derived_seed("original", seed, i))
        originals.append(member)
        unlearned_pop.append(unlearn_fn(member))
        retrained_pop.append(_train_fresh(template, dm.retain_set, dm, epochs, None, derived_seed("reference", seed, i)))
    forget_labels = np.asarray(dm.train_targets)[dm.forget_indices]
    test_labels = np.asarray(dm.test_targets)
    held = np.flatnonzero(np.isin(test_labels, np.unique(forget_labels)))
    heldout = Subset(dm.test_dataset, held.tolist())

    def stats(models: list[nn.Module]) -> tuple[np.ndarray, np.ndarray]:
        raw = population_statistics(models, dm.forget_set)
        return raw, class_calibrated(raw, forget_labels, population_statistics(models, heldout), test_labels[held])

    (u_raw, u_cal), (o_raw, o_cal), (r_raw, r_cal) = stats(unlearned_pop), stats(originals), stats(retrained_pop)
    unlearned_raw, pairs = _auc(u_raw, r_raw)
    verdict = Verdict(k, unlearned_raw, _auc(u_cal, r_cal)[0], _auc(o_raw, r_raw)[0], _auc(o_cal, r_cal)[0],
                      (min(pairs), max(pairs)), time.perf_counter() - start, halves_auc(r_raw, seed=seed),
                      halves_auc(r_cal, seed=seed))
    log.info("attack verdict: %s", verdict.to_dict())
    return verdict
