"""The one code path every engine runs: prepare (scores -> mask), apply_reset, plan_repair; count-weighted scores."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.mask import select_channels
from lightning_unlearn.orchestration import apply_reset, plan_repair, prepare
from lightning_unlearn.reset import DAMPEN_FACTOR
from lightning_unlearn.scoring import channel_scores
from lightning_unlearn.scoring.channels import average_scores

CLASS3 = ForgetRequest(classes=[3])


@pytest.fixture
def scores(trained_model, class3_dm):
    return channel_scores(trained_model, class3_dm.forget_dataloader())


def test_prepare_is_the_configured_selection(trained_model, scores):
    config = UnlearnConfig(ratio=0.2).resolved(CLASS3)
    mask = prepare(trained_model, scores, config)
    assert mask == select_channels(scores, trained_model, 0.2, "layer", None, False, [3])
    with pytest.raises(ValueError, match="needs a resolved config"):
        prepare(trained_model, scores, UnlearnConfig())


def test_prepare_never_selects_what_the_user_froze(trained_model, scores):
    trained_model.fc2.requires_grad_(False)  # the head: its forgotten row is not selected either
    mask = prepare(trained_model, scores, UnlearnConfig().resolved(CLASS3))
    assert not mask.masks["fc2.weight"].any() and not mask.masks["fc2.bias"].any() and "fc2" not in mask.channels
    trained_model.requires_grad_(False)
    with pytest.raises(ValueError, match="every scored layer is frozen"):
        prepare(trained_model, scores, UnlearnConfig().resolved(CLASS3))


def test_apply_reset_dampens_and_reestimates_or_reports_the_statistics_to_estimate(trained_model, scores, class3_dm):
    config = UnlearnConfig(reset="dampen").resolved(CLASS3)
    mask = prepare(trained_model, scores, config)
    before = copy.deepcopy(trained_model)
    outcome = apply_reset(trained_model, mask, config, class3_dm.retain_dataloader())
    assert outcome.changed == mask.num_selected and outcome.batchnorm_batches > 0
    assert set(outcome.batchnorm_channels) == {"bn1", "bn2"}
    w = mask.masks["conv1.weight"]
    assert torch.equal(trained_model.conv1.weight[w], before.conv1.weight[w] * DAMPEN_FACTOR)
    server = copy.deepcopy(before)  # a federated server: no data, the statistics are left to the clients
    outcome = apply_reset(server, mask, config)
    assert outcome.batchnorm_batches == 0 and torch.equal(server.bn1.running_mean, before.bn1.running_mean)
    assert apply_reset(copy.deepcopy(before), mask, UnlearnConfig(reset="none").resolved(CLASS3)).changed == 0


def test_plan_repair_gives_the_head_rows_their_rate_and_sizes_the_budget(trained_model, scores):
    config = UnlearnConfig(objective="random_label", lr_scale=2.0, head_lr_scale=10.0).resolved(CLASS3)
    mask = prepare(trained_model, scores, config)
    plan = plan_repair(mask, config, scores.layers, retain_batches=19)
    assert plan.learning_rates.params == {"fc2.weight": 10.0, "fc2.bias": 10.0} and plan.learning_rates.factor == 2.0
    assert (plan.max_steps, plan.check_every, plan.forget_aware) == (38, 5, True)  # two epochs; ~10 checks, >= 5 apart
    same = plan_repair(mask, UnlearnConfig(lr_scale=2.0, head_lr_scale=None).resolved(CLASS3), scores.layers, 19)
    assert same.learning_rates.params == {} and not same.forget_aware  # the default objective: retain data only
    with pytest.raises(ValueError, match="pass retain_batches"):
        plan_repair(mask, config, scores.layers)


def test_count_weighted_scores_of_parts_are_the_scores_of_the_union(trained_model, class3_dm):
    forget = class3_dm.forget_set
    whole = channel_scores(trained_model, DataLoader(forget, batch_size=64))
    cut = 50
    parts = [channel_scores(trained_model, DataLoader(Subset(forget, idx), batch_size=64))
             for idx in (range(cut), range(cut, len(forget)))]
    averaged = average_scores([(p, p.num_samples) for p in parts])
    for name in whole:
        torch.testing.assert_close(averaged[name], whole[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="no samples were scored"):
        average_scores([(parts[0], 0)])
