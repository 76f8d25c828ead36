"""SelectiveUnlearning on an existing Trainer, the mixin in either base position, unlearn() / retrain()."""
import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_unlearn import ForgetRequest, UnlearningMixin, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.metrics import split_accuracies


class PlainNet(pl.LightningModule):
    """A user's ordinary module: (x, y) batches, own optimizer, no knowledge of unlearning."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
        self.seen_batches = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen_batches += 1
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MixinFirst(UnlearningMixin, PlainNet):
    pass


class MixinLast(PlainNet, UnlearningMixin):
    pass


def _pretrained(cls, digits):
    torch.manual_seed(0)
    model = cls()
    from tests.conftest import FullTrainData

    fit(model, FullTrainData(digits[0]), 4)
    return model


@pytest.mark.parametrize("cls", [MixinFirst, MixinLast])
def test_mixin_in_either_position_forgets_with_the_users_own_training_step(cls, digits, class3_dm):
    model = _pretrained(cls, digits)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = split_accuracies(model, class3_dm)
    cb = SelectiveUnlearning(method="grad_x_act", ratio=0.1, objective="random_label", reset="dampen", calibrate="none",
                             epochs=2)
    model.seen_batches = 0
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, datamodule=class3_dm)
    after = split_accuracies(model, class3_dm)
    assert model.seen_batches > 0  # the user's training_step handled the retain half
    assert before["forget_acc"] > 0.8 and after["forget_acc"] <= 0.1
    assert after["remaining_acc"] >= before["remaining_acc"] - 0.1
    assert 0 < cb.mask.fraction < 0.25
    assert frozen_elements_equal(model, original, cb.mask)
    assert set(cb.scores) == {"net.0", "net.3"}
    assert [r["epoch"] for r in cb.history] == [0, 1] and cb.history[-1]["forget_acc"] == pytest.approx(after["forget_acc"])
    assert "training_step" not in vars(model)  # routing removed after fit


class _NoInstancePatch(pl.Callback):
    """Records, at every batch, whether anything replaced the module's training_step on the instance."""

    def __init__(self):
        self.patched, self.batches = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.patched.append("training_step" in vars(pl_module))
        self.batches.append(sorted(batch) if isinstance(batch, dict) else "plain")


def test_the_mixin_dispatches_combined_batches_without_patching_the_instance(digits, class3_dm):
    model = _pretrained(MixinLast, digits)
    spy = _NoInstancePatch()
    cb = SelectiveUnlearning(objective="random_label", max_steps=3, early_stopping=False, log_metrics=False)
    pl.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb, spy]).fit(model, datamodule=class3_dm)
    assert spy.patched == [False] * 3 and spy.batches == [["forget", "retain"]] * 3
    assert not hasattr(class3_dm, "combined") and not hasattr(class3_dm, "train_on")  # no flag to flip back
    spy = _NoInstancePatch()  # the next fit without the callback trains on plain retain batches
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[spy]).fit(model, datamodule=class3_dm)
    assert spy.batches == ["plain"] * 2


def test_without_mixin_retain_objective_works_and_forget_aware_names_the_mixin(digits, class3_dm):
    model = _pretrained(PlainNet, digits)
    with pytest.raises(TypeError, match="needs the model to subclass lightning_unlearn.UnlearningMixin"):
        fit(copy.deepcopy(model), class3_dm, 1, [SelectiveUnlearning(objective="random_label")])
    cb = SelectiveUnlearning(objective="retain", log_metrics=False)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, class3_dm, 1, [cb])
    assert frozen_elements_equal(model, original, cb.mask)


def test_the_defaults_run_on_a_module_without_the_mixin_for_every_request_kind(digits):
    """A user's plain module: the class default (retain repair + head calibration) needs no mixin; the sample
    default's held-out target does, so without it the default repairs on retain data only and says so."""
    from lightning_unlearn import ForgetRequest
    from lightning_unlearn.data import UnlearningDataModule

    model = _pretrained(PlainNet, digits)
    for request in (ForgetRequest(classes=[3]), ForgetRequest(sample_ids=list(range(0, 200, 4)))):
        dm = UnlearningDataModule(digits[0], digits[1], request, batch_size=64)
        cb = SelectiveUnlearning(log_metrics=False)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        work = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(work, dm, 1, [cb])
        assert frozen_elements_equal(work, original, cb.mask)
        if request.classes:
            assert cb.resolved_config.calibrate == "head" and cb.resolved_config.objective == "retain"
        else:
            assert cb.resolved_config.objective == "retain"
            assert any("needs the module to subclass" in str(w.message) for w in caught)


def test_ascent_objective_is_capped_and_forgets(digits, class3_dm):
    model = _pretrained(MixinFirst, digits)
    result = unlearn(model, class3_dm, objective="ascent", epochs=2)
    assert result.metrics["forget_acc"] <= 0.1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lime"}, r"unknown scoring method 'lime'; allowed methods are"),
        ({"objective": "forget"}, r"unknown objective 'forget'; allowed values are \['auto', 'random_label', 'ascent', 'retain', 'heldout'\]"),
        ({"threshold": float("nan")}, r"threshold must be a finite number >= 0 and <= 1, got nan"),
        ({"forget_weight": -1.0}, r"forget_weight must be a finite number >= 0, got -1.0"),
        ({"ratio": True}, r"ratio must be in \(0, 1\], got True"),
        ({"max_stpes": 3}, r"unknown unlearning setting\(s\) \['max_stpes'\]; allowed settings are \['method'"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"bn_stats": "train"}, r"unknown bn_stats 'train'"),
    ],
)
def test_bad_callback_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveUnlearning(**kwargs)


@pytest.mark.parametrize("budget, expected_steps", [({"epochs": 1, "early_stopping": False}, 19),
                                                    ({"epochs": 3, "max_steps": 7}, 7)])
def test_callback_owns_its_budget_on_a_generous_trainer(digits, class3_dm, trained_model, budget, expected_steps):
    """Like EarlyStopping: a Trainer left at max_epochs=1000 stops after the config's epochs or max_steps (a repair
    the rule does not end first: no head calibration to defer the forgetting to, so it must forget by itself)."""
    cb = SelectiveUnlearning(objective="retain", reset="dampen", calibrate="none", log_metrics=False, **budget)
    trainer = pl.Trainer(max_epochs=1000, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    trainer.fit(trained_model, datamodule=class3_dm)
    assert trainer.global_step == expected_steps  # 1,210 retain samples / 64 per batch = 19 steps an epoch


def test_callback_needs_an_unlearning_datamodule(trained_model, digits):
    from tests.conftest import FullTrainData

    with pytest.raises(ValueError, match="needs trainer.fit\\(model, datamodule=UnlearningDataModule"):
        fit(trained_model, FullTrainData(digits[0]), 1, [SelectiveUnlearning()])


def test_unlearn_and_retrain_on_a_sample_request(trained_model, digits):
    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(sample_ids=list(range(0, 1347, 10))))
    original = {k: v.clone() for k, v in trained_model.state_dict().items()}
    result = unlearn(trained_model, dm, ratio=0.1, epochs=1)
    assert all(torch.equal(v, original[k]) for k, v in trained_model.state_dict().items())  # input untouched
    assert frozen_elements_equal(result.model, original, result.mask)
    assert set(result.timings_s) >= {"scoring", "unlearning", "total"}
    assert 0 <= result.metrics["forget_acc"] <= 1 and result.metrics["test_acc"] > 0.8
    reference = retrain(trained_model, dm, epochs=3)
    assert reference.metrics["test_acc"] > 0.8 and reference.timings_s["retrain"] > 0
    assert not torch.equal(reference.model.conv1.weight, trained_model.conv1.weight)


class HeadRowOnly(SelectiveUnlearning):
    """A subclass replaces one step (selection) and wraps another (reset): the extension points."""

    def select(self, pl_module, scores):
        from lightning_unlearn.mask import ParameterMask

        mask = ParameterMask.empty(pl_module)
        mask.masks["fc2.weight"][3] = True
        return mask

    def reset(self, trainer, pl_module, mask):
        self.reset_masks = getattr(self, "reset_masks", []) + [mask.sha256()]
        return super().reset(trainer, pl_module, mask)


def test_a_subclass_overrides_selection_and_reset(trained_model, class3_dm):
    original = {k: v.clone() for k, v in trained_model.state_dict().items()}
    callback = HeadRowOnly(log_metrics=False, objective="retain", max_steps=3, early_stopping=False)
    pl.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[callback]).fit(trained_model, datamodule=class3_dm)
    assert callback.mask.num_selected == trained_model.fc2.weight.shape[1] and callback.scores is not None
    assert callback.reset_masks == [callback.mask.sha256()]
    changed = {k for k, v in trained_model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {"fc2.weight"}
    assert torch.equal(trained_model.fc2.weight[:3], original["fc2.weight"][:3])
