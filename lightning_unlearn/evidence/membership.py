"""Membership inference: does the model still treat the forget samples like training data?

Two attacks. ``mia_efficacy`` is SalUn's (Fan et al., ICLR 2024) SVC attack on the true-label
softmax confidence, reported together with the shadow classifier's own held-out accuracy,
because a shadow classifier near 50% gives a score that flips between 0 and 1 for models
that behave alike. ``loss_attack_auc`` is threshold-free: the ROC AUC of "lower loss =
member" between forget samples and held-out samples. Both subsample with a seeded
generator, so the same seed gives the same number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import SVC
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn._modes import eval_modes, restore_modes

INFORMATIVE_SHADOW_ACC = 0.55


@dataclass(frozen=True)
class SampleOutputs:
    """Per-sample true-label confidence and cross-entropy loss of one model on one dataset."""

    confidence: np.ndarray
    loss: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class MIAResult:
    """SalUn MIA-efficacy with the evidence needed to read it.

    ``efficacy``: fraction of forget samples the shadow SVC calls non-members (1 = looks unseen).
    ``shadow_acc``: the SVC's 3-fold held-out accuracy on members vs non-members; below
    ``INFORMATIVE_SHADOW_ACC`` the attack cannot tell them apart and the efficacy means nothing.
    """

    efficacy: float
    shadow_acc: float
    informative: bool
    num_members: int
    num_nonmembers: int
    num_forget: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        flag = "" if self.informative else ", uninformative"
        return f"{self.efficacy:.3f} (shadow acc {self.shadow_acc:.3f}{flag})"


@torch.no_grad()
def sample_outputs(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> SampleOutputs:
    """True-label softmax confidence and CE loss of every sample (model in eval mode, restored after)."""
    device = next(model.parameters()).device
    conf, loss, labels = [], [], []
    modes = eval_modes(model)
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = batch[0].to(device), batch[1].to(device).long()
            logits = model(x)
            conf.append(F.softmax(logits, -1).gather(1, y[:, None]).squeeze(1).cpu())
            loss.append(F.cross_entropy(logits, y, reduction="none").cpu())
            labels.append(y.cpu())
    finally:
        restore_modes(modes)
    if not conf:
        return SampleOutputs(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
    cat = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return SampleOutputs(cat(conf), cat(loss), torch.cat(labels).numpy())


def subsample(dataset: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most ``n`` samples (the dataset itself when it is small enough)."""
    if n is None or len(dataset) <= n:
        return dataset
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, picked.tolist())


def _check_two_groups(name: str, members: int, nonmembers: int) -> None:
    if members == 0 or nonmembers == 0:
        raise ValueError(
            f"{name} needs samples of 2 classes (members and non-members) to train or score an attack; "
            f"got {members} member and {nonmembers} non-member samples"
        )


def mia_efficacy(
    model: nn.Module,
    retain: Dataset,
    test: Dataset,
    forget: Dataset,
    max_samples: int | None = 2000,
    seed: int = 0,
) -> MIAResult:
    """SalUn's MIA-efficacy.

    Shadow members are retain-train samples, as many as the (capped) non-member set; shadow
    non-members are ``test`` samples (pass the remaining-class test set for class requests).
    Feature: true-label softmax confidence. Classifier: ``SVC(C=3, gamma="auto", kernel="rbf")``.
    Efficacy: fraction of ``forget`` samples predicted non-member.
    """
    nonmembers = subsample(test, max_samples, seed)
    members = subsample(retain, len(nonmembers), seed + 1)
    forget = subsample(forget, max_samples, seed + 2)
    _check_two_groups("MIA-efficacy", len(members), len(nonmembers))
    if len(forget) == 0:
        raise ValueError("MIA-efficacy needs forget samples to score; the forget set is empty")
    m, n = sample_outputs(model, members), sample_outputs(model, nonmembers)
    x = np.concatenate([m.confidence, n.confidence])[:, None]
    y = np.concatenate([np.ones(len(m.confidence)), np.zeros(len(n.confidence))])
    svc = lambda: SVC(C=3, gamma="auto", kernel="rbf")  # noqa: E731
    folds = min(3, len(m.confidence), len(n.confidence))
    if folds >= 2:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        shadow_acc = float(cross_val_score(svc(), x, y, cv=cv).mean())
    else:  # too few samples for a held-out estimate: training accuracy, flagged below
        shadow_acc = float(svc().fit(x, y).score(x, y))
    clf = svc().fit(x, y)
    f = sample_outputs(model, forget)
    efficacy = float(1.0 - clf.predict(f.confidence[:, None]).mean())
    informative = shadow_acc >= INFORMATIVE_SHADOW_ACC and folds >= 2
    return MIAResult(efficacy, shadow_acc, informative, len(members), len(nonmembers), len(forget))


def loss_attack_auc(
    model: nn.Module, members: Dataset, nonmembers: Dataset, max_samples: int | None = 2000, seed: int = 0
) -> float:
    """ROC AUC of the loss attack: score = -loss, label 1 for ``members``.

    0.5: members and non-members have the same loss distribution (nothing remembered);
    near 1: the model is much surer on the members. Both groups are cut to the same size.
    """
    _check_two_groups("the loss attack", len(members), len(nonmembers))
    n = min(len(members), len(nonmembers), max_samples or len(members))
    a = sample_outputs(model, subsample(members, n, seed)).loss
    b = sample_outputs(model, subsample(nonmembers, n, seed + 1)).loss
    y = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    return float(roc_auc_score(y, -np.concatenate([a, b])))
