"""Distance to the exact answer: the retrain gap, relearn time, and the checks that make them comparable."""
from __future__ import annotations

import copy
import itertools
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.evidence.membership import subsample
from lightning_unlearn.metrics import accuracy

GAP_KEYS = ("forget_acc", "remaining_acc", "test_acc", "mia_efficacy")
# Without MIA-efficacy: use when the shadow classifier is at chance and the MIA score flips at random.
ACC_GAP_KEYS = ("forget_acc", "remaining_acc", "test_acc")


def avg_gap(unlearned: Mapping[str, float | None], retrained: Mapping[str, float | None], keys: Sequence[str] = GAP_KEYS) -> float:
    """SalUn's Avg. Gap in percentage points: mean |unlearned - retrained| over ``keys`` (fractions in [0, 1])."""
    missing = [k for k in keys if unlearned.get(k) is None or retrained.get(k) is None]
    if missing:
        raise ValueError(f"Avg. Gap needs {list(keys)} for both models; missing or None: {missing}")
    return 100.0 * sum(abs(float(unlearned[k]) - float(retrained[k])) for k in keys) / len(keys)


def num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """Number of classes ``model`` predicts (width of its output on ``example``)."""
    device = next(model.parameters()).device
    modes = eval_modes(model)
    try:
        with torch.no_grad():
            return int(model(example[:1].to(device)).shape[-1])
    finally:
        restore_modes(modes)


def check_same_classes(original: nn.Module, other: nn.Module, example: torch.Tensor, name: str = "retrained") -> None:
    """A reference model must predict the same classes as the original, or every comparison is meaningless."""
    a, b = num_outputs(original, example), num_outputs(other, example)
    if a != b:
        raise ValueError(
            f"the {name} model predicts {b} classes but the original predicts {a}; "
            f"they must share the label space (retrain the same architecture with num_classes={a})"
        )


def check_forget_size(num_forget: int, num_train: int) -> None:
    """A forget set cannot be larger than the training set it is taken from."""
    if num_forget > num_train:
        raise ValueError(
            f"the forget set has {num_forget} samples but the training set only {num_train}; "
            f"allowed forget sizes are 1..{num_train - 1}"
        )


def relearn_time(
    model: nn.Module,
    forget: Dataset,
    retain: Dataset,
    target_acc: float,
    eval_set: Dataset | None = None,
    num_classes: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 32,
    max_steps: int = 200,
    eval_every: int = 5,
    seed: int = 0,
) -> int | None:
    """Adam steps of plain fine-tuning until forget accuracy reaches ``target_acc`` (None: not within ``max_steps``).

    Each batch mixes forget samples and an equal number of retain samples: fine-tuning on
    the forgotten class alone would reach any accuracy in a few steps by predicting that
    class for everything, which measures nothing. Accuracy is checked on ``eval_set``
    (default: the forget set) every ``eval_every`` steps. A model that still holds the
    forgotten knowledge relearns it faster than one that never had it. ``model`` is not modified.
    """
    if len(forget) == 0:
        raise ValueError("relearn time needs forget samples; the forget set is empty")
    work = copy.deepcopy(model)
    work.train()
    device = next(work.parameters()).device
    retain_part = subsample(retain, len(forget), seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ConcatDataset([forget, retain_part]), batch_size=batch_size, shuffle=True, generator=gen)
    eval_loader = DataLoader(subsample(eval_set if eval_set is not None else forget, 1000, seed), batch_size=512)
    classes = num_classes or int(next(iter(eval_loader))[1].max()) + 1
    opt = torch.optim.Adam(work.parameters(), lr=lr)
    if (accuracy(work, eval_loader, max(classes, 2)) or 0.0) >= target_acc:
        return 0
    torch.manual_seed(seed)
    for step, batch in enumerate(itertools.islice(_forever(loader), max_steps), start=1):
        x, y = batch[0].to(device), batch[1].to(device).long()
        opt.zero_grad()
        F.cross_entropy(work(x), y).backward()
        opt.step()
        if step % eval_every == 0 and (accuracy(work, eval_loader, max(classes, 2)) or 0.0) >= target_acc:
            return step
    return None


def _forever(loader: DataLoader):
    while True:
        yield from loader
