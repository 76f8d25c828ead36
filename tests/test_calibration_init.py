"""The head calibration's initialisation: the forgotten row starts orthogonal to its class's mean forget feature, so
the seed no longer decides how far the forgotten logit falls on the forgotten data."""
from __future__ import annotations

import copy
import functools

import torch
from torch.utils.data import DataLoader

from lightning_unlearn.repair import calibrate_head
from lightning_unlearn.repair.calibration import head_features

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def _mean_forget_logit(model, dm) -> float:
    with torch.no_grad():
        return float(torch.cat([model.eval()(x)[:, 3] for x, _ in DataLoader(dm.forget_set, batch_size=512)]).mean())


def _spread(trained_model, dm, forget_loader) -> tuple[float, list[float]]:
    logits = []
    for seed in range(4):
        model = copy.deepcopy(trained_model)
        calibrate_head(model, dm.retain_dataloader(shuffle=False), [3], "fc2", ADAM, steps=60, seed=seed,
                       forget_loader=forget_loader)
        logits.append(_mean_forget_logit(model, dm))
    return max(logits) - min(logits), logits


def test_the_refit_row_starts_orthogonal_to_the_mean_forget_feature(trained_model, class3_dm, one_thread):
    model = copy.deepcopy(trained_model)
    calibrate_head(model, class3_dm.retain_dataloader(shuffle=False), [3], "fc2",
                   functools.partial(torch.optim.SGD, lr=0.0), steps=1, seed=0,
                   forget_loader=class3_dm.forget_dataloader(shuffle=False))
    features, _ = head_features(model, model.fc2, class3_dm.forget_dataloader(shuffle=False))
    mean = features.mean(0)
    assert abs(float(model.fc2.weight[3].detach() @ mean)) < 1e-4 * float(mean.norm() * model.fc2.weight[3].detach().norm())
    drawn = copy.deepcopy(trained_model)  # without the forget data the drawn row keeps its component
    calibrate_head(drawn, class3_dm.retain_dataloader(shuffle=False), [3], "fc2",
                   functools.partial(torch.optim.SGD, lr=0.0), steps=1, seed=0)
    assert abs(float(drawn.fc2.weight[3].detach() @ mean)) > 1e-2 * float(mean.norm() * drawn.fc2.weight[3].detach().norm())


def test_the_seed_barely_moves_the_forgotten_logit_once_the_row_starts_orthogonal(
        trained_model, class3_dm, one_thread):
    drawn, drawn_logits = _spread(trained_model, class3_dm, None)
    orthogonal, orth_logits = _spread(trained_model, class3_dm, class3_dm.forget_dataloader(shuffle=False))
    assert orthogonal < 0.5 * drawn, (orth_logits, drawn_logits)
