"""Representation probe: is the forgotten class still linearly readable from the features?

Forgetting only the classifier row already drives forget accuracy to 0, so accuracy alone
cannot tell "the class left the features" from "the head stopped saying it". A logistic
regression fitted on the penultimate features of a small labelled probe set (all classes)
answers that: its accuracy on the forgotten class stays high when the features still
separate it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn._modes import eval_modes, restore_modes
from lightning_unlearn.scoring import discover_layers
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.evidence.membership import subsample


@dataclass(frozen=True)
class ProbeResult:
    """Probe accuracy on the forgotten classes' held-out probe samples and on all of them."""

    forget_acc: float
    overall_acc: float
    num_fit: int
    num_eval: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def penultimate_features(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Input of the classifier head for every sample: ``model.features(x)`` if defined, else a hook on the head."""
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    extract = getattr(model, "features", None)
    grabbed: list[Tensor] = []
    handle = None
    if not callable(extract):
        first = next(iter(loader))[0][:2].to(device)
        head = next(n for n, info in discover_layers(model, first).items() if info.is_head)
        module = dict(model.named_modules())[head]
        handle = module.register_forward_pre_hook(lambda _, inputs: grabbed.append(inputs[0].flatten(1).cpu()))
    feats, labels = [], []
    modes = eval_modes(model)
    try:
        for batch in loader:
            x = batch[0].to(device)
            if handle is None:
                feats.append(extract(x).flatten(1).cpu())
            else:
                model(x)
                feats.append(grabbed.pop())
            labels.append(torch.as_tensor(batch[1]).cpu())
    finally:
        restore_modes(modes)
        if handle is not None:
            handle.remove()
    return torch.cat(feats).double().numpy(), torch.cat(labels).numpy()


def probe_accuracy(
    model: nn.Module,
    probe_set: Dataset,
    forget_classes: Sequence[int],
    max_samples: int | None = 2000,
    seed: int = 0,
) -> ProbeResult:
    """Fit a logistic-regression probe on half of ``probe_set`` (stratified, seeded), score the other half.

    ``probe_set`` should be held-out labelled data of all classes (e.g. the test set), so the
    probe measures what the features encode, not what the model memorised.
    """
    if not forget_classes:
        raise ValueError("the probe needs forgotten classes to report on (a class request); got none")
    data = subsample(probe_set, max_samples, seed)
    labels = dataset_targets(data).numpy()
    missing = [c for c in forget_classes if not (labels == c).any()]
    if missing:
        raise ValueError(f"the probe set has no samples of forgotten class(es) {missing}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the probe needs samples of at least 2 classes; got only class {labels[0]}")
    x, y = penultimate_features(model, data)
    x_fit, x_eval, y_fit, y_eval = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_fit, y_fit)
    pred = probe.predict(x_eval)
    forget = np.isin(y_eval, np.asarray(list(forget_classes)))
    return ProbeResult(
        float((pred[forget] == y_eval[forget]).mean()), float((pred == y_eval).mean()), len(y_fit), len(y_eval)
    )
