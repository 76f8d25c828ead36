"""The head calibration and the held-out objective: pluggable repair steps, exact freeze kept, seeded."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_unlearn import ForgetRequest, UnlearnConfig, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import ClassifierModule
from lightning_unlearn.repair import calibrate_head, heldout_targets, memorisation_gap, optimizer_recipe
from lightning_unlearn.repair.calibration import head_features

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _retain(dm: UnlearningDataModule) -> DataLoader:
    return dm.retain_dataloader(shuffle=False)


def _predictions(model: nn.Module, dataset) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(x).argmax(1) for x, _ in DataLoader(dataset, batch_size=512)])


def _phi(model: nn.Module, dataset) -> torch.Tensor:
    """logit_y - logsumexp(other logits) per sample (the attack's confidence statistic)."""
    with torch.no_grad():
        out = []
        for x, y in DataLoader(dataset, batch_size=512):
            z = model.eval()(x).double()
            out.append(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z.scatter(1, y[:, None], float("-inf")), 1))
        return torch.cat(out)


# -- calibrate_head on its own ---------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [ADAM, SGD], ids=["adam", "sgd-momentum-wd"])
def test_calibration_changes_only_the_forgotten_rows_and_the_class_is_never_predicted(
        trained_model, class3_dm, digits, one_thread, optimizer):
    before = copy.deepcopy(trained_model.state_dict())
    rng = torch.get_rng_state()
    changed = calibrate_head(trained_model, _retain(class3_dm), [3], "fc2", optimizer, steps=120, seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG moved"
    after = trained_model.state_dict()
    assert changed == trained_model.fc2.in_features + 1
    for name, value in after.items():
        if name in ("fc2.weight", "fc2.bias"):
            keep = torch.ones(len(value), dtype=torch.bool)
            keep[3] = False
            assert torch.equal(value[keep], before[name][keep]) and not torch.equal(value[3], before[name][3])
        else:
            assert torch.equal(value, before[name]), name
    assert not (_predictions(trained_model, digits[1]) == 3).any()
    assert not (_predictions(trained_model, digits[0]) == 3).any()


def test_calibration_is_seeded_and_reproducible(trained_model, class3_dm, one_thread):
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(trained_model)
        calibrate_head(model, _retain(class3_dm), [3], "fc2", ADAM, steps=40, seed=seed)
        runs.append(torch.cat([model.fc2.weight[3], model.fc2.bias[3:4]]).detach())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_hand_written_gradient_is_the_cross_entropy_gradient(trained_model, class3_dm, one_thread):
    """One plain SGD step of lr 1 equals autograd's step on the mean cross-entropy over all logits."""
    loader = DataLoader(Subset(class3_dm.retain_set, list(range(64))), batch_size=64)
    model = copy.deepcopy(trained_model)
    calibrate_head(model, loader, [3, 5], "fc2", functools.partial(torch.optim.SGD, lr=0.0), steps=1, seed=0)
    start_w, start_b = model.fc2.weight[[3, 5]].detach().clone(), model.fc2.bias[[3, 5]].detach().clone()
    stepped = copy.deepcopy(trained_model)
    calibrate_head(stepped, loader, [3, 5], "fc2", functools.partial(torch.optim.SGD, lr=1.0), steps=1, seed=0)
    x, y = head_features(model, model.fc2, loader)
    w, b = model.fc2.weight.detach().clone().requires_grad_(True), model.fc2.bias.detach().clone().requires_grad_(True)
    F.cross_entropy(x @ w.T + b, y).backward()
    assert torch.allclose(stepped.fc2.weight[[3, 5]], start_w - w.grad[[3, 5]], atol=1e-6)
    assert torch.allclose(stepped.fc2.bias[[3, 5]], start_b - b.grad[[3, 5]], atol=1e-6)


class ConvHead(ClassifierModule):
    """A fully convolutional classifier: its last layer is a 1x1 convolution, no Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 10, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x))).mean((2, 3))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_model_without_a_linear_head_is_refused_in_one_line_before_any_work(class3_dm, one_thread):
    model = ConvHead()
    with pytest.raises(ValueError, match=r"calibrate='head' needs a Linear classifier head; ConvHead's head 'out' is "
                                         r"Conv2d") as err:
        calibrate_head(model, _retain(class3_dm), [3], "out", ADAM, steps=1, seed=0)
    assert "\n" not in str(err.value)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs a Linear classifier head"):
        unlearn(model, class3_dm, calibrate="head", inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "work started before the refusal"


def test_optimizer_recipe_copies_class_and_settings_not_state():
    params = [nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=True)
    params[0].grad = torch.ones(2)
    opt.step()
    fresh = optimizer_recipe(opt)([nn.Parameter(torch.zeros(2))])
    group = fresh.param_groups[0]
    assert type(fresh) is torch.optim.SGD and (group["lr"], group["momentum"], group["nesterov"]) == (0.3, 0.9, True)
    assert not fresh.state
    adamw = torch.optim.AdamW([nn.Parameter(torch.ones(2))], lr=0.01, weight_decay=0.05)
    group = optimizer_recipe(adamw)([nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.01, 0.05)


# -- the calibration under the callback ------------------------------------------------------------------------
def test_callback_calibrates_inside_the_mask_and_keeps_the_exact_freeze(trained_model, class3_dm, digits, one_thread):
    original = copy.deepcopy(trained_model.state_dict())
    result = unlearn(trained_model, class3_dm, calibrate="head", calibrate_epochs=3, max_steps=10)
    assert result.config.calibrate == "head" and "calibration" in result.timings_s
    assert frozen_elements_equal(result.model, original, result.mask)
    assert bool(result.mask.masks["fc2.weight"][3].all()) and not bool(result.mask.masks["fc2.weight"][4].any())
    assert not (_predictions(result.model, digits[1]) == 3).any()
    plain = unlearn(trained_model, class3_dm, max_steps=10)  # the same fit without it: only row 3 differs
    assert torch.equal(plain.model.conv1.weight, result.model.conv1.weight)
    assert not torch.equal(plain.model.fc2.weight[3], result.model.fc2.weight[3])
    assert torch.equal(plain.model.fc2.weight[:3], result.model.fc2.weight[:3])


def test_calibration_settings_fail_fast(trained_model, class3_dm, digits, one_thread):
    before = copy.deepcopy(trained_model.state_dict())
    with pytest.raises(ValueError, match=r"refits head rows \[3\] but the mask does not select them in fc2.weight"):
        unlearn(trained_model, class3_dm, calibrate="head", head_rows=None, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in trained_model.state_dict().items())
    samples = UnlearningDataModule(digits[0], digits[1], ForgetRequest(sample_ids=[1, 2, 3]), batch_size=64)
    with pytest.raises(ValueError, match="calibrate='head' needs a class request"):
        unlearn(trained_model, samples, calibrate="head")
    for field in ({"calibrate": "head"}, {"objective": "heldout"}):
        with pytest.raises(ValueError, match="runs on the central engine only"):
            UnlearnConfig(**field).resolved(ForgetRequest(classes=[3]), "federated")
    # the default calibrates class requests (the AUTO table decides per request kind) ...
    assert UnlearnConfig().resolved(ForgetRequest(classes=[3])).calibrate == "head"
    assert UnlearnConfig().resolved(ForgetRequest(sample_ids=[1])).calibrate == "none"
    # ... but "auto" skips it quietly where explicit "head" fails fast: the forgotten head rows left out of the mask
    skipped = unlearn(trained_model, class3_dm, head_rows=None, max_steps=2, early_stopping=False)
    assert skipped.config.calibrate == "none" and "calibration" not in skipped.timings_s
    assert UnlearnConfig(calibrate_epochs="auto").calibration_epochs(30) == 30
    assert UnlearnConfig(calibrate_epochs=4).calibration_epochs(30) == 4


# -- the held-out objective ------------------------------------------------------------------------------------
@pytest.fixture
def samples_dm(digits):
    ids = sorted(np.random.default_rng(0).choice(len(digits[0]), 100, replace=False).tolist())
    return UnlearningDataModule(digits[0], digits[1], ForgetRequest(sample_ids=ids), batch_size=64)


def test_heldout_targets_lower_the_true_class_by_the_memorisation_gap(trained_model, samples_dm):
    gap = memorisation_gap(trained_model, samples_dm.retain_set, samples_dm.test_dataset, 10, samples=256, seed=0)
    assert gap.shape == (10,) and bool((gap >= 0).all()) and float(gap.max()) > 0
    targets = heldout_targets(trained_model, samples_dm.forget_set, gap)
    assert targets.shape == (100, 10) and torch.allclose(targets.sum(1), torch.ones(100), atol=1e-5)
    y = samples_dm.train_targets[samples_dm.forget_indices]
    with torch.no_grad():
        original = torch.cat([trained_model.eval()(x).softmax(1) for x, _ in samples_dm.forget_dataloader()])
    lowered = gap[y] > 0
    assert bool((targets[lowered, y[lowered]] < original[lowered, y[lowered]]).all())
    assert memorisation_gap(trained_model, samples_dm.retain_set, samples_dm.test_dataset, 10, 256, 0).equal(gap)


def _membership_gap(model: nn.Module, dm: UnlearningDataModule) -> float:
    """Mean confidence on the forget samples minus the same model's on held-out test samples of their classes."""
    heldout, test_y = _phi(model, dm.test_dataset), dm.test_targets
    y = dm.train_targets[dm.forget_indices]
    level = torch.stack([heldout[test_y == c].mean() for c in y.tolist()]).mean()
    return float(_phi(model, dm.forget_set).mean() - level)


def test_heldout_objective_moves_forget_confidence_toward_held_out_with_the_exact_freeze(
        trained_model, samples_dm, one_thread):
    original = copy.deepcopy(trained_model.state_dict())
    budget = dict(reset="none", early_stopping=False, max_steps=30)
    result = unlearn(trained_model, samples_dm, objective="heldout", **budget)
    assert frozen_elements_equal(result.model, original, result.mask)
    assert result.extra["steps"] == 30 and "targets" in result.timings_s
    control = unlearn(trained_model, samples_dm, objective="retain", **budget)  # the same repair without the target
    before, after, without = (_membership_gap(m, samples_dm) for m in (trained_model, result.model, control.model))
    print(f"forget minus held-out confidence: original {before:.3f}, heldout {after:.3f}, retain-only {without:.3f}")
    assert before > 0 and abs(after) < before and abs(after) < abs(without)


def test_heldout_objective_without_targets_fails_in_one_line(trained_model):
    trained_model.configure_unlearning("heldout")
    x, y = torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="objective 'heldout' needs forget batches"):
        trained_model.forget_loss((x, y))


def test_the_cli_reads_the_originals_epochs_from_its_checkpoint(tmp_path, digits, one_thread):
    import lightning.pytorch as pl

    from lightning_unlearn.commands import trained_epochs
    from lightning_unlearn.models import SmallCNN

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(SmallCNN(), DataLoader(Subset(digits[0], list(range(128))), batch_size=64))
    trainer.save_checkpoint(tmp_path / "original.ckpt")
    assert trained_epochs(tmp_path / "original.ckpt") == 2
    torch.save({"state_dict": SmallCNN().state_dict()}, tmp_path / "plain.ckpt")
    assert trained_epochs(tmp_path / "plain.ckpt") is None


def test_when_auto_cannot_calibrate_it_resets_instead_and_says_so(
        trained_model, class3_dm, one_thread):
    """calibrate='auto' skips the calibration when the head rows are not in the mask: it falls back to the dampening
    reset and says so, and the stopping rule's verdict says when the class is still not forgotten."""
    import copy
    import warnings

    from lightning_unlearn import unlearn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = unlearn(copy.deepcopy(trained_model), class3_dm, head_rows=None)
    assert result.config.calibrate == "none" and result.config.reset == "dampen"
    assert any("no head calibration" in str(w.message) for w in caught)
    if result.metrics["forget_acc"] > 0.5:  # not forgotten: the user is told, never a silent success
        assert any("before forgetting and repair both held" in str(w.message) for w in caught)
