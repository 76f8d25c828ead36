"""Remove, then repair: the selected slices are reset, everything else (BatchNorm statistics included) stays exact."""
from __future__ import annotations

import copy

import pytest
import torch

from lightning_unlearn import UnlearnConfig, unlearn
from lightning_unlearn._training import reinitialize
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.reset import DAMPEN_FACTOR, reestimate_batchnorm, reset_selected
from lightning_unlearn.mask import select_channels


@pytest.fixture
def selected(trained_model, class3_dm):
    from lightning_unlearn.scoring import channel_scores

    scores = channel_scores(trained_model, class3_dm.forget_dataloader())
    return select_channels(scores, trained_model, ratio=0.25, head_rows=[3])


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def test_reinit_draws_the_selected_slices_from_the_models_own_initialisation(trained_model, selected, class3_dm):
    before = {n: p.detach().clone() for n, p in trained_model.named_parameters()}
    buffers = _buffers(trained_model)
    fresh = dict(reinitialize(copy.deepcopy(trained_model), 7).named_parameters())
    changed = reset_selected(trained_model, selected, "reinit", seed=7)
    assert changed == selected.num_selected
    for name, p in trained_model.named_parameters():
        keep = selected.masks[name]
        assert torch.equal(p.detach()[keep], fresh[name].detach()[keep])
    assert frozen_elements_equal(trained_model, before, selected)  # nothing outside the mask moved
    used = reestimate_batchnorm(trained_model, selected, class3_dm.retain_dataloader())
    assert used > 0
    for name, bn in ((n, m) for n, m in trained_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)):
        sel = selected.masks[f"{name}.weight"]
        mean, old_mean = bn.running_mean, buffers[f"{name}.running_mean"]
        assert torch.equal(mean[~sel], old_mean[~sel]) and torch.equal(bn.running_var[~sel], buffers[f"{name}.running_var"][~sel])
        assert not torch.equal(mean[sel], old_mean[sel]) and not torch.equal(mean[sel], torch.zeros_like(mean[sel]))
        assert torch.equal(bn.num_batches_tracked, buffers[f"{name}.num_batches_tracked"])
        assert bn.momentum == 0.1  # restored


def test_dampen_scales_the_selected_slices(trained_model, selected):
    before = {n: p.detach().clone() for n, p in trained_model.named_parameters()}
    reset_selected(trained_model, selected, "dampen")
    for name, p in trained_model.named_parameters():
        keep = selected.masks[name]
        assert torch.allclose(p.detach()[keep], before[name][keep] * DAMPEN_FACTOR)
    assert frozen_elements_equal(trained_model, before, selected)


def test_unlearn_with_reset_keeps_frozen_elements_and_statistics_exact(trained_model, class3_dm, one_thread):
    original = {n: p.detach().clone() for n, p in trained_model.named_parameters()}
    buffers = _buffers(trained_model)
    result = unlearn(trained_model, class3_dm, UnlearnConfig(reset="reinit", objective="retain", ratio=0.25, epochs=1))
    assert frozen_elements_equal(result.model, original, result.mask)
    assert "reset" in result.timings_s and result.metrics["forget_acc"] < 0.5
    for name, bn in ((n, m) for n, m in result.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)):
        sel = result.mask.masks[f"{name}.weight"]
        assert torch.equal(bn.running_mean[~sel], buffers[f"{name}.running_mean"][~sel])


def test_reset_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match=r"unknown reset 'zero'; allowed values are \['auto', 'none', 'reinit', 'dampen'\]"):
        UnlearnConfig(reset="zero")
    with pytest.raises(ValueError, match="reset 'auto' resolves per request"):
        reset_selected(torch.nn.Linear(2, 2), None, "auto")


def test_reinit_leaves_the_global_rng_alone(trained_model, selected):
    """A reset in the middle of a fit must not re-seed the user's run (it did: torch.manual_seed(config.seed))."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    reset_selected(trained_model, selected, "reinit", seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_callable_reset_gets_a_seeded_generator(trained_model, selected, class3_dm, one_thread):
    draws = []

    def noise(model, mask, generator):
        draws.append(torch.rand(3, generator=generator))
        changed = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                keep = mask.masks[name]
                p.copy_(torch.where(keep, torch.zeros_like(p), p))
                changed += int(keep.sum())
        return changed

    original = copy.deepcopy(trained_model)
    assert reset_selected(trained_model, selected, noise, seed=5) == selected.num_selected
    assert frozen_elements_equal(trained_model, dict(original.named_parameters()), selected)
    assert all(not p[selected.masks[n]].any() for n, p in trained_model.named_parameters())
    reset_selected(copy.deepcopy(original), selected, noise, seed=5)
    assert torch.equal(draws[0], draws[1])  # seeded from the config's seed
    result = unlearn(original, class3_dm, reset=noise, max_steps=3, early_stopping=False)
    assert result.config.to_dict()["reset"] == "noise" and len(draws) == 3
