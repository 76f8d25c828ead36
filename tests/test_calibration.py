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
    with pytest.raises(ValueError, match=r"objective='heldout' runs on the central engine only; allowed federated"):
        UnlearnConfig(objective="heldout").resolved(ForgetRequest(classes=[3]), "federated")
    assert UnlearnConfig(calibrate="head").resolved(ForgetRequest(classes=[3]), "federated").calibrate == "head"
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


# -- the procedure's guarantees, pinned down -------------------------------------------------------------------
def test_calibration_starts_from_a_fresh_row_and_fits_it(trained_model, class3_dm, one_thread):
    """The forgotten row is re-initialised, not fine-tuned: whatever the original row held, the result is the same;
    and it is fitted: more steps lower the retain cross-entropy of the head."""
    scrambled = copy.deepcopy(trained_model)
    with torch.no_grad():
        scrambled.fc2.weight[3].mul_(-7.0).add_(3.0)
        scrambled.fc2.bias[3].add_(11.0)
    runs = []
    for model in (copy.deepcopy(trained_model), scrambled):
        calibrate_head(model, _retain(class3_dm), [3], "fc2", ADAM, steps=30, seed=0)
        runs.append((model.fc2.weight[3].detach().clone(), model.fc2.bias[3].detach().clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    features, labels = head_features(trained_model, trained_model.fc2, _retain(class3_dm))
    losses = []
    for steps in (1, 200):
        model = copy.deepcopy(trained_model)
        calibrate_head(model, _retain(class3_dm), [3], "fc2", ADAM, steps=steps, seed=0)
        with torch.no_grad():
            losses.append(float(F.cross_entropy(model.fc2(features), labels)))
    assert losses[1] < losses[0], losses


def test_default_class_request_stops_recovered_and_leaves_the_forgetting_to_the_calibration(
        trained_model, class3_dm, one_thread):
    """On the digits CNN the repair stops once the other classes are back ("recovered (the calibration forgets)"),
    with class 3 still recognised at that check; the check after the calibration, on the returned model, finds it
    forgotten, at the same step."""
    result = unlearn(trained_model, class3_dm)
    assert result.config.calibrate == "head"
    assert result.extra["stop_reason"] == "recovered (the calibration forgets)"
    before, after = result.extra["stopping"][-2:]
    assert not before["forgotten"] and before["forget_acc"] > 0.5 and before["recovered"]
    assert after["step"] == before["step"] == result.extra["steps"]
    assert after["forgotten"] and after["recovered"] and after["forget_acc"] <= 0.01
    assert result.metrics["forget_acc"] == 0.0


class TinyAttention(ClassifierModule):
    """8x8 digits as 8 tokens of 8 pixels: embedding, LayerNorm, multi-head self-attention (its packed in_proj
    weight is a bare Parameter, not a Linear), LayerNorm, mean pooling, a Linear head; a positional buffer. AdamW
    with weight decay, which moves zero-gradient weights unless the freeze is enforced."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)
        self.register_buffer("position", torch.linspace(-0.5, 0.5, 8)[:, None].expand(8, 16).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.embed(x.reshape(len(x), 8, 8)) + self.position)
        h = self.norm2(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)


def _assert_frozen_outside_the_mask(result, params: dict, buffers: dict) -> None:
    """Every parameter element outside the mask and every buffer not owned by a selected channel are bit-equal."""
    changed = 0
    for name, p in result.model.named_parameters():
        keep = result.mask.masks[name]
        assert torch.equal(p.detach()[~keep], params[name][~keep]), name
        changed += int((p.detach()[keep] != params[name][keep]).sum())
    assert changed > 0, "nothing inside the mask moved"
    modules = dict(result.model.named_modules())
    for name, b in result.model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        sel = result.mask.masks.get(f"{owner}.weight")
        if isinstance(modules.get(owner), nn.modules.batchnorm._BatchNorm) and leaf in ("running_mean", "running_var"):
            assert torch.equal(b[~sel], buffers[name][~sel]), name
        else:
            assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("arch", ["batchnorm-cnn", "layernorm-attention"])
def test_head_calibration_keeps_every_parameter_and_buffer_outside_the_mask_bit_exact(
        trained_model, class3_dm, digits, one_thread, arch):
    from lightning_unlearn._training import fit
    from lightning_unlearn.demo import _AllTrainData

    if arch == "batchnorm-cnn":
        model = trained_model
    else:
        torch.manual_seed(0)
        model = TinyAttention()
        fit(model, _AllTrainData(digits[0], 64), 6)
        model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    head = "fc2" if arch == "batchnorm-cnn" else "head"
    result = unlearn(model, class3_dm, calibrate="head", calibrate_epochs=3)
    assert result.config.calibrate == "head" and "calibration" in result.timings_s
    assert not torch.equal(result.model.get_submodule(head).weight[3], params[f"{head}.weight"][3])  # refit
    _assert_frozen_outside_the_mask(result, params, buffers)
    if arch == "layernorm-attention":
        assert not bool(result.mask.masks["attn.in_proj_weight"].all())  # a frozen share exists to check
