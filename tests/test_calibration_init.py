"""The head calibration's initialisation: a re-initialised row may not start out favouring the class it must forget
(its component along the class's mean forget feature is made non-positive), so no seed leaves the forgotten logit
high on the forgotten data."""
from __future__ import annotations

import copy
import functools

import torch
from torch.utils.data import DataLoader

from lightning_unlearn.repair import calibrate_head
from lightning_unlearn.repair.calibration import head_features

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
FROZEN = functools.partial(torch.optim.SGD, lr=0.0)  # one step of lr 0: the initialisation as drawn


def _mean_forget_logit(model, dm) -> float:
    with torch.no_grad():
        return float(torch.cat([model.eval()(x)[:, 3] for x, _ in DataLoader(dm.forget_set, batch_size=512)]).mean())


def _calibrated(trained_model, dm, optimizer, steps, seed, with_forget):
    model = copy.deepcopy(trained_model)
    calibrate_head(model, dm.retain_dataloader(shuffle=False), [3], "fc2", optimizer, steps=steps, seed=seed,
                   forget_loader=dm.forget_dataloader(shuffle=False) if with_forget else None)
    return model


def test_a_drawn_row_favouring_the_class_is_reflected_and_one_against_it_is_kept(trained_model, class3_dm, one_thread):
    features, _ = head_features(trained_model, trained_model.fc2, class3_dm.forget_dataloader(shuffle=False))
    mean = features.mean(0)
    signs = set()
    for seed in range(6):
        drawn = _calibrated(trained_model, class3_dm, FROZEN, 1, seed, with_forget=False).fc2.weight[3].detach()
        start = _calibrated(trained_model, class3_dm, FROZEN, 1, seed, with_forget=True).fc2.weight[3].detach()
        along = float(drawn @ mean)
        signs.add(along > 0)
        assert torch.allclose(start @ mean, torch.tensor(-abs(along)), atol=1e-4 * abs(along) + 1e-6), seed
        rest = lambda w: w - (w @ mean) / (mean @ mean) * mean  # noqa: E731
        assert torch.allclose(rest(start), rest(drawn), atol=1e-5), "only the component along the mean may change"
    assert signs == {True, False}, "the seeds must cover both signs of the drawn component"


def test_no_seed_leaves_the_forgotten_logit_higher_than_its_drawn_row_would(trained_model, class3_dm, one_thread):
    lower = 0
    for seed in range(4):
        drawn = _mean_forget_logit(_calibrated(trained_model, class3_dm, ADAM, 60, seed, with_forget=False), class3_dm)
        kept = _mean_forget_logit(_calibrated(trained_model, class3_dm, ADAM, 60, seed, with_forget=True), class3_dm)
        assert kept <= drawn + 1e-4, (seed, kept, drawn)
        lower += kept < drawn - 0.1
    assert lower >= 1, "some seed's drawn row favoured the class and must end lower"
