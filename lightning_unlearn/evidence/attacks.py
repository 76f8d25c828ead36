"""Per-example membership attacks with reference models, the NeurIPS'23 challenge score, tug-of-war.

Population attacks (``membership.py``) ask whether forget samples *as a group* look like
training data; at the scale of this project they sit at chance for every model. The attacks
here calibrate every example against models that never trained on it, which is what lets
them tell an unlearned model from a retrained one (Carlini et al. 2022, "Membership inference
attacks from first principles" (LiRA); Hayes et al. 2024, "Inexact unlearning needs more
careful evaluations to avoid a false sense of privacy" (U-LiRA)).

The statistic is LiRA's logit-scaled true-label confidence,
``phi(x, y) = log(p_y / (1 - p_y)) = logit_y - logsumexp(logits without y)`` (computed from
the logits, so it never overflows). Three variants, each named in its results:

* ``offline_attack`` -- offline LiRA (Carlini et al. Sec. IV-C, one-sided): per example, a
  Gaussian fit to phi over the K reference models (retrained without the forget set: "out");
  a model's score is ``(phi - mu_out) / sigma_out``. ROC over forget samples (positives) vs
  held-out test samples of the same classes (negatives; no model trained on them). This is
  what :func:`attack_evidence` (the CLI's ``--attack ulira``) reports: the original scores
  high when it memorised; an unlearned model that really forgot scores 0.5, like a retrained one.
* ``ulira_attack`` -- U-LiRA (Hayes et al. Sec. 3): per forget example, Gaussians of phi over
  the unlearned population ("in": the method run on independently trained originals) and the
  retrained population ("out"); score = ``log N(phi; in) - log N(phi; out)``. ROC over the
  forget samples scored under held-out unlearned models (positives) vs the same samples under
  held-out retrained models (negatives), leave-one-out over the populations. 0.5 = the method
  is indistinguishable from retraining.
* ``challenge_score`` -- the NeurIPS 2023 unlearning challenge (Triantafillou et al. 2024,
  "Are we making progress in unlearning?", arXiv:2406.09073, Sec. 3, and the competition's
  scoring code): per-example epsilon from threshold attacks on the two populations' outputs,
  bucketed into a forget score, times the retain and test accuracy ratios to retraining.

With fewer than 64 models per population the variance is pooled over examples ("global"),
as LiRA recommends for few shadow models.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence.references import audit_indices, train_references

log = logging.getLogger(__name__)

ATTACKS = ("ulira",)
VARIANCES = ("auto", "global", "per_example")
PER_EXAMPLE_MIN_MODELS = 64  # below this, per-example variances are too noisy (LiRA, Fig. 9)
INFORMATIVE_AUC = 0.70  # the attack must see the original's membership before it may rank methods
CHALLENGE_DELTA = 0.01
CHALLENGE_BIN_WIDTH = 0.5
CHALLENGE_BINS = 13
TOW_KEYS = ("forget_train_acc", "retain_train_acc", "test_acc")


# -- statistics ---------------------------------------------------------------------
@torch.no_grad()
def logit_confidence(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: LiRA's ``phi = logit_y - logsumexp(other logits)`` and whether the prediction is correct."""
    device = next(model.parameters()).device
    modes = eval_modes(model)
    phis, correct = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = batch[0].to(device), batch[1].to(device).long()
            logits = model(x).double()
            true = logits.gather(1, y[:, None]).squeeze(1)
            others = logits.scatter(1, y[:, None], float("-inf"))
            phis.append((true - torch.logsumexp(others, dim=1)).cpu())
            correct.append((logits.argmax(1) == y).cpu())
    finally:
        restore_modes(modes)
    if not phis:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return torch.cat(phis).numpy(), torch.cat(correct).numpy()


def population_statistics(models: Sequence[nn.Module], dataset: Dataset) -> np.ndarray:
    """phi of every model on every sample: shape (models, samples)."""
    return np.stack([logit_confidence(m, dataset)[0] for m in models]) if models else np.zeros((0, len(dataset)))


def gaussian_fit(stats: np.ndarray, variance: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation over models (rows); pooled variance unless K >= 64."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed values are {list(VARIANCES)}")
    k = stats.shape[0]
    if k < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 models per population, got {k}")
    mu = stats.mean(0)
    var = stats.var(0, ddof=1)
    if variance == "global" or (variance == "auto" and k < PER_EXAMPLE_MIN_MODELS):
        var = np.full_like(var, var.mean())
    return mu, np.sqrt(np.maximum(var, 1e-8))


def _variance_used(k: int, variance: str) -> str:
    return "global" if variance == "global" or (variance == "auto" and k < PER_EXAMPLE_MIN_MODELS) else "per_example"


# -- ROC summaries ------------------------------------------------------------------
@dataclass(frozen=True)
class AttackResult:
    """ROC summary of one attack: AUC and TPR at low FPR (positives = members / unlearned)."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    num_positive: int
    num_negative: int

    @property
    def min_resolvable_fpr(self) -> float:
        """1 / negatives: a TPR at a smaller FPR is the TPR at FPR = 0."""
        return 1.0 / self.num_negative

    def to_dict(self) -> dict[str, Any]:
        return {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_0.1pct_fpr": self.tpr_at_01pct_fpr,
            "num_positive": self.num_positive,
            "num_negative": self.num_negative,
            "min_resolvable_fpr": self.min_resolvable_fpr,
        }


def roc_result(positive: np.ndarray, negative: np.ndarray) -> AttackResult:
    """AUC and TPR at 1% / 0.1% FPR (the highest TPR whose FPR does not exceed the target, as in LiRA)."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError(f"an attack ROC needs positives and negatives; got {len(positive)} and {len(negative)}")
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    s = np.r_[positive, negative]
    fpr, tpr, _ = roc_curve(y, s)
    at = lambda target: float(tpr[fpr <= target].max())  # noqa: E731 - fpr[0] == 0 always
    return AttackResult(float(roc_auc_score(y, s)), at(0.01), at(0.001), len(positive), len(negative))


def _auc_fast(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half), for bootstraps."""
    ranks = rankdata(np.r_[pos, neg])
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# -- the attacks --------------------------------------------------------------------
def offline_scores(phi: np.ndarray, out_stats: np.ndarray, variance: str = "auto") -> np.ndarray:
    """Offline LiRA: ``(phi - mu_out) / sigma_out`` per example (higher = more member-like)."""
    mu, sigma = gaussian_fit(out_stats, variance)
    return (phi - mu) / sigma


def online_scores(phi: np.ndarray, in_stats: np.ndarray, out_stats: np.ndarray, variance: str = "auto") -> np.ndarray:
    """LiRA / U-LiRA likelihood ratio ``log N(phi; in) - log N(phi; out)`` per example."""
    mu_in, s_in = gaussian_fit(in_stats, variance)
    mu_out, s_out = gaussian_fit(out_stats, variance)
    log_in = -0.5 * ((phi - mu_in) / s_in) ** 2 - np.log(s_in)
    log_out = -0.5 * ((phi - mu_out) / s_out) ** 2 - np.log(s_out)
    return log_in - log_out


def offline_attack(
    models: Mapping[str, nn.Module],
    references: Sequence[nn.Module],
    members: Dataset,
    nonmembers: Dataset,
    variance: str = "auto",
) -> dict[str, AttackResult]:
    """Offline LiRA for each of ``models``: ``members`` (positives) vs ``nonmembers`` (negatives).

    ``references`` must not have trained on either set. The variance is pooled over both sets'
    examples when it is global.
    """
    both = _concat(members, nonmembers)
    out = population_statistics(references, both)
    n = len(members)
    result = {}
    for name, model in models.items():
        z = offline_scores(logit_confidence(model, both)[0], out, variance)
        result[name] = roc_result(z[:n], z[n:])
    return result


def ulira_scores(unlearned: np.ndarray, retrained: np.ndarray, variance: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """U-LiRA scores with leave-one-out target models: (positives, negatives), each (pairs, examples).

    For pair i, the Gaussians are fit without unlearned model i and retrained model i, which
    are then scored: the held-out unlearned model gives the positives, the held-out retrained
    model the negatives. Scoring many held-out models averages out model-level offsets (one
    model slightly more confident everywhere) that would otherwise decide a one-pair ROC.
    Shapes: (Ku, N) and (Kr, N) phi arrays, at least 3 models each.
    """
    pairs = min(len(unlearned), len(retrained))
    if pairs < 3:
        raise ValueError(f"U-LiRA needs at least 3 models per population (2 left after holding one out); got "
                         f"{len(unlearned)} unlearned and {len(retrained)} retrained")
    pos, neg = [], []
    for i in range(pairs):
        u_in, r_out = np.delete(unlearned, i, 0), np.delete(retrained, i, 0)
        pos.append(online_scores(unlearned[i], u_in, r_out, variance))
        neg.append(online_scores(retrained[i], u_in, r_out, variance))
    return np.stack(pos), np.stack(neg)


def ulira_attack(
    unlearned_population: Sequence[nn.Module],
    retrained_population: Sequence[nn.Module],
    forget: Dataset,
    variance: str = "auto",
) -> AttackResult:
    """U-LiRA (Hayes et al. 2024): can an attacker tell the method's models from retrained ones, per forget sample?

    ``unlearned_population``: the method run on independently trained originals;
    ``retrained_population``: models retrained from scratch without the forget set, same recipe
    as the originals. ROC over (held-out model, forget sample) pairs, see :func:`ulira_scores`:
    0.5 = indistinguishable from retraining, 1 = every unlearned model is recognised.
    """
    pos, neg = ulira_scores(population_statistics(unlearned_population, forget),
                            population_statistics(retrained_population, forget), variance)
    return roc_result(pos.ravel(), neg.ravel())


# -- the NeurIPS 2023 challenge score -------------------------------------------------
def _threshold_rates(u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR of every single-threshold attack, in both directions, per example.

    ``u``: (Ku, N) outputs of unlearned models (positives), ``r``: (Kr, N) of retrained ones.
    Thresholds are the observed values (as in the challenge's best-threshold attack, which
    predicts "unlearned" above the threshold); we add the mirrored attack (below the threshold),
    which stands in for the challenge's second attack (logistic regression) catching either direction.
    """
    t = np.concatenate([u, r])[None]  # (1, T, N)
    u_, r_ = u[:, None], r[:, None]  # (K, 1, N)
    fpr_above, fnr_above = (r_ > t).mean(0), (u_ <= t).mean(0)  # (T, N)
    fpr_below, fnr_below = (r_ < t).mean(0), (u_ >= t).mean(0)
    return np.concatenate([fpr_above, fpr_below]), np.concatenate([fnr_above, fnr_below])


def per_example_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float = CHALLENGE_DELTA) -> np.ndarray:
    """Per-example epsilon of the challenge (arXiv:2406.09073, Sec. 3.2; the competition's ``compute_epsilon_s``).

    For each attack with rates (FPR, FNR): ``max(log(1 - delta - FPR) - log(FNR), log(1 - delta - FNR) - log(FPR))``;
    epsilon = max over attacks and 0. As in the competition's code, an attack with FPR = FNR = 0
    (the populations are perfectly separated) gives infinity, an attack with exactly one of
    them 0 is discarded, and logs of non-positive numbers are ignored. Shapes: (K, N) -> (N,).
    """
    unlearned, retrained = np.asarray(unlearned, float), np.asarray(retrained, float)
    if unlearned.ndim != 2 or retrained.ndim != 2 or unlearned.shape[1] != retrained.shape[1]:
        raise ValueError(f"outputs must be (models, examples) arrays over the same examples; got "
                         f"{unlearned.shape} and {retrained.shape}")
    if min(unlearned.shape[0], retrained.shape[0]) < 2:
        raise ValueError(f"the challenge score needs at least 2 models per population; got {unlearned.shape[0]} "
                         f"unlearned and {retrained.shape[0]} retrained")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    fpr, fnr = _threshold_rates(unlearned, retrained)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1 - delta - fpr) - np.log(fnr)
        e2 = np.log(1 - delta - fnr) - np.log(fpr)
    eps = np.fmax(e1, e2)  # NaN only where both logs are undefined
    eps = np.where(np.isnan(eps), np.inf, eps)
    eps = np.where((fpr == 0) ^ (fnr == 0), -np.inf, eps)  # discarded attacks
    eps = np.where((fpr == 0) & (fnr == 0), np.inf, eps)
    return np.maximum(eps.max(0), 0.0)


def forget_quality(epsilons: np.ndarray, bin_width: float = CHALLENGE_BIN_WIDTH, bins: int = CHALLENGE_BINS) -> float:
    """The challenge's forgetting quality F: bucket k of each epsilon (width 0.5) scores 2 / 2^k; mean over examples.

    Bucket 1 (epsilon < 0.5) scores 1; epsilon >= 6 (and infinity) scores 2 / 2^13.
    """
    edges = np.arange(bins) * bin_width
    return float(np.mean(2.0 / 2.0 ** np.digitize(np.asarray(epsilons, float), edges)))


def challenge_score(
    unlearned: np.ndarray,
    retrained: np.ndarray,
    retain_acc_u: float,
    retain_acc_r: float,
    test_acc_u: float,
    test_acc_r: float,
    delta: float = CHALLENGE_DELTA,
) -> dict[str, Any]:
    """``final = F * RA_u / RA_r * TA_u / TA_r`` (arXiv:2406.09073, Eq. 3), with F from :func:`forget_quality`.

    ``unlearned`` / ``retrained``: (models, forget examples) outputs of the two populations
    (here: phi of each forget example); accuracies are population means in [0, 1].
    """
    eps = per_example_epsilon(unlearned, retrained, delta)
    f = forget_quality(eps)
    ra, ta = retain_acc_u / retain_acc_r, test_acc_u / test_acc_r
    finite = eps[np.isfinite(eps)]
    return {
        "forget_score": f,
        "final_score": f * ra * ta,
        "retain_acc_ratio": ra,
        "test_acc_ratio": ta,
        "epsilon_median": float(np.median(eps)),
        "epsilon_infinite_fraction": float(np.mean(~np.isfinite(eps))),
        "epsilon_max_finite": float(finite.max()) if len(finite) else None,
        "num_unlearned": int(unlearned.shape[0]),
        "num_retrained": int(retrained.shape[0]),
        "num_examples": int(unlearned.shape[1]),
        "delta": delta,
    }


def population_challenge_score(
    unlearned_models: Sequence[nn.Module],
    retrained_models: Sequence[nn.Module],
    forget: Dataset,
    retain: Dataset,
    test: Dataset,
    delta: float = CHALLENGE_DELTA,
) -> dict[str, Any]:
    """:func:`challenge_score` from models: phi on ``forget``, mean accuracy on ``retain`` and ``test``."""
    def acc(models, ds):
        return float(np.mean([logit_confidence(m, ds)[1].mean() for m in models]))

    return challenge_score(
        population_statistics(unlearned_models, forget), population_statistics(retrained_models, forget),
        acc(unlearned_models, retain), acc(retrained_models, retain),
        acc(unlearned_models, test), acc(retrained_models, test), delta,
    )


# -- tug of war ---------------------------------------------------------------------
def tug_of_war(unlearned: Mapping[str, float | None], retrained: Mapping[str, float | None],
               keys: Sequence[str] = TOW_KEYS) -> float:
    """ToW (Zhao et al. 2024, "What makes unlearning hard and what to do about it"), in [0, 1].

    ``prod(1 - |acc_u - acc_r|)`` over forget-set, retain-set and test accuracy (fractions);
    1 = the same accuracies as the retrained model. Defaults read ``split_accuracies`` keys.
    """
    missing = [k for k in keys if unlearned.get(k) is None or retrained.get(k) is None]
    if missing:
        raise ValueError(f"tug-of-war needs {list(keys)} for both models; missing or None: {missing}")
    out = 1.0
    for k in keys:
        out *= 1.0 - abs(float(unlearned[k]) - float(retrained[k]))
    return out


# -- held-out samples and the one-call evidence ---------------------------------------
def matched_heldout(test_targets: torch.Tensor | np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Test indices with the class histogram of ``labels`` (all of a class when the test set has fewer)."""
    test_targets = np.asarray(test_targets)
    rng = np.random.default_rng(seed)
    picked = []
    for c, count in zip(*np.unique(np.asarray(labels), return_counts=True)):
        pool = np.flatnonzero(test_targets == c)
        picked.append(rng.choice(pool, size=min(count, len(pool)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


def _concat(a: Dataset, b: Dataset) -> Dataset:
    return ConcatDataset([a, b])


def _seeded_subset(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(indices) <= n:
        return np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.asarray(indices), size=n, replace=False)).astype(np.int64)


def evidence_sets(
    datamodule: UnlearningDataModule, retain_sample: int = 500, seed: int = 0, max_samples: int = 1000
) -> dict[str, np.ndarray]:
    """The index sets the attacks use: forget (train), matched held-out (test), retain audit (train), its held-out (test)."""
    train_t = np.asarray(datamodule.train_targets)
    forget = _seeded_subset(np.asarray(datamodule.forget_indices), max_samples, seed)
    audit = audit_indices(datamodule, retain_sample, seed)
    return {
        "forget": forget,
        "forget_heldout": matched_heldout(datamodule.test_targets, train_t[forget], seed),
        "audit": audit,
        "audit_heldout": matched_heldout(datamodule.test_targets, train_t[audit], seed + 1),
    }


def retain_exposure(before: np.ndarray, after: np.ndarray, n_members: int, seed: int = 0, rounds: int = 1000) -> dict[str, Any]:
    """Did unlearning make retained members easier to detect? Paired bootstrap of the AUC change.

    ``before``/``after``: offline-LiRA scores of the same examples (members first, then held-out)
    under the original and the unlearned model. ``more_exposed``: the 95% interval of
    ``AUC_after - AUC_before`` lies above 0.
    """
    rng = np.random.default_rng(seed)
    pos, neg = np.arange(n_members), np.arange(n_members, len(before))
    diffs = []
    for _ in range(rounds):
        p, q = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        diffs.append(_auc_fast(after[p], after[q]) - _auc_fast(before[p], before[q]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    b, a = roc_result(before[pos], before[neg]), roc_result(after[pos], after[neg])
    return {"before": b.to_dict(), "after": a.to_dict(), "auc_change": a.auc - b.auc,
            "auc_change_ci95": [float(lo), float(hi)], "more_exposed": bool(lo > 0)}


def attack_evidence(
    original: nn.Module,
    unlearned: nn.Module,
    datamodule: UnlearningDataModule,
    references: int = 8,
    attack: str = "ulira",
    epochs: int = 20,
    trainer_kwargs: dict | None = None,
    cache_dir: str | Path = "outputs/references",
    seed: int = 0,
    retain_sample: int = 500,
    progress: bool = True,
    max_samples: int = 1000,
    variance: str = "auto",
    models: Mapping[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Per-example attack evidence for one unlearned model, with ``references`` cached reference models.

    Trains (or loads from ``cache_dir``) ``references`` copies of ``original``'s architecture
    from scratch on the retain set for ``epochs`` epochs (pass the original's training
    schedule), leaving out a seeded audit sample of ``retain_sample`` retain points (at most
    10% of the retain set). Then offline LiRA (module docstring) for the original, the
    unlearned model and any extra ``models``: forget samples (at most ``max_samples``) vs
    held-out test samples of the same classes; and the audit points vs their held-out samples,
    before (original) and after (unlearned) unlearning.

    ``informative`` is True when the attack detects the original's membership
    (AUC >= 0.70): only then do the other AUCs rank anything. Returns a JSON-able dict under the key ``attack``.
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; allowed attacks are {list(ATTACKS)}")
    if isinstance(references, bool) or not isinstance(references, int) or references < 2:
        raise ValueError(f"references must be an integer >= 2 (a Gaussian needs 2 models), got {references!r}")
    if retain_sample < 0 or max_samples < 1:
        raise ValueError(f"retain_sample must be >= 0 and max_samples >= 1; got {retain_sample!r} and {max_samples!r}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed values are {list(VARIANCES)}")
    sets = evidence_sets(datamodule, retain_sample, seed, max_samples)
    if len(sets["forget_heldout"]) == 0:
        raise ValueError("the test set has no samples of the forget set's classes: nothing to compare the forget samples with")
    template = copy.deepcopy(original).cpu()
    pop = train_references(template, datamodule, references, epochs, trainer_kwargs, cache_dir, seed,
                           exclude=sets["audit"], progress=progress)
    train, test = datamodule.train_dataset, datamodule.test_dataset
    device = next(original.parameters()).device
    refs = [m.to(device) for m in pop.models]
    named = {"original": original, "unlearned": unlearned, **(models or {})}
    forget = offline_attack(named, refs, Subset(train, sets["forget"].tolist()),
                            Subset(test, sets["forget_heldout"].tolist()), variance)
    out: dict[str, Any] = {
        "references": references,
        "variant": "offline LiRA (Carlini et al. 2022), one-sided z-score against the references' per-example "
                   "Gaussian; positives: forget samples, negatives: held-out test samples of the same classes",
        "statistic": "logit-scaled true-label confidence, logit_y - logsumexp(other logits)",
        "variance": _variance_used(references, variance),
        "forget": forget["unlearned"].to_dict(),
        "per_model": {name: r.to_dict() for name, r in forget.items()},
        "informative": bool(forget["original"].auc >= INFORMATIVE_AUC),
        "informative_rule": f"the original's forget AUC >= {INFORMATIVE_AUC}",
        "cache": {"key": pop.key, "folder": str(pop.folder), "trained": pop.trained},
        "epochs": epochs,
        "seed": seed,
    }
    if len(sets["audit"]) >= 2 and len(sets["audit_heldout"]) >= 2:
        both = _concat(Subset(train, sets["audit"].tolist()), Subset(test, sets["audit_heldout"].tolist()))
        out_stats = population_statistics(refs, both)
        before = offline_scores(logit_confidence(original, both)[0], out_stats, variance)
        after = offline_scores(logit_confidence(unlearned, both)[0], out_stats, variance)
        out["retain_exposure"] = {**retain_exposure(before, after, len(sets["audit"]), seed), "num_audited": len(sets["audit"])}
    else:
        out["retain_exposure"] = None
    for m in refs:
        m.cpu()
    return {attack: out}
