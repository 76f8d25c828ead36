"""SelectiveUnlearning across fits: resume, reuse, schedulers, frozen layers, accumulation, non-finite values.

Each test reproduces a defect of the second reliability probe (issue 21, items 3, 4, 5, 6, 7, 10, 13) with the
public API only, so it runs against the code before the fix too (where it fails).
"""
from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_unlearn import ForgetRequest, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 1e-3  # SmallCNN's default learning rate


def _trainer(callback, **kwargs) -> pl.Trainer:
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, max_epochs=-1)
    return pl.Trainer(callbacks=[callback], **{**options, **kwargs})


def _rates(trainer: pl.Trainer) -> list[float]:
    return [g["lr"] for g in trainer.optimizers[0].param_groups]


def _checkpoint(trained_model, dm, tmp_path, steps: int, **settings):
    """A fit interrupted by the Trainer's own ``max_steps`` after ``steps`` optimizer steps, saved to a checkpoint."""
    callback = SelectiveUnlearning(log_metrics=False, **settings)
    trainer = _trainer(callback, max_steps=steps)
    trainer.fit(trained_model, datamodule=dm)
    path = tmp_path / "interrupted.ckpt"
    trainer.save_checkpoint(path)
    return path, _rates(trainer)


# -- item 3: resuming keeps the learning-rate groups and does not scale them again -------------------------
def test_resume_with_a_head_group_restores_the_groups_and_rates(trained_model, class3_dm, tmp_path):
    settings = dict(lr_scale=2.0, head_lr_scale=5.0, early_stopping=False, max_steps=6, objective="retain")
    path, before = _checkpoint(copy.deepcopy(trained_model), class3_dm, tmp_path, 3, **settings)
    assert before == pytest.approx([2 * LR, 5 * LR])
    callback = SelectiveUnlearning(log_metrics=False, **settings)
    trainer = _trainer(callback)
    trainer.fit(copy.deepcopy(trained_model), datamodule=class3_dm, ckpt_path=path)  # raised: different groups
    assert _rates(trainer) == pytest.approx([2 * LR, 5 * LR])
    assert trainer.global_step == 6 and str(callback.stop_reason) == "step budget"


def test_resume_does_not_scale_the_learning_rate_again(trained_model, class3_dm, tmp_path):
    settings = dict(lr_scale=2.0, head_lr_scale=None, early_stopping=False, max_steps=6, objective="retain")
    path, before = _checkpoint(copy.deepcopy(trained_model), class3_dm, tmp_path, 3, **settings)
    trainer = _trainer(SelectiveUnlearning(log_metrics=False, **settings))
    trainer.fit(copy.deepcopy(trained_model), datamodule=class3_dm, ckpt_path=path)
    assert before == _rates(trainer) == pytest.approx([2 * LR])  # was 0.004 after one resume


# -- item 4: schedulers that compute from base rates ------------------------------------------------------------
class PerStepSchedule(SmallCNN):
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("head_lr_scale", [None, 50.0])
def test_a_per_step_lambda_schedule_keeps_the_scales(trained_model, class3_dm, head_lr_scale):
    model = PerStepSchedule()
    model.load_state_dict(trained_model.state_dict())
    callback = SelectiveUnlearning(log_metrics=False, lr_scale=5.0, head_lr_scale=head_lr_scale, early_stopping=False,
                                   max_steps=4, objective="retain")
    trainer = _trainer(callback)
    trainer.fit(model, datamodule=class3_dm)  # head_lr_scale=50 raised "zip() argument 2 is shorter"
    expected = [5 * LR] + ([50 * LR] if head_lr_scale else [])
    assert _rates(trainer) == pytest.approx(expected)  # the 5x was dropped after the first scheduler step
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx(expected)


# -- item 5: one callback, two requests --------------------------------------------------------------------------
def test_a_reused_callback_computes_a_new_mask_for_a_new_request(trained_model, digits):
    callback = SelectiveUnlearning(log_metrics=False, max_steps=5, early_stopping=False, objective="retain")
    rows = {}
    for cls in (3, 7):
        dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[cls]), batch_size=64)
        _trainer(callback).fit(copy.deepcopy(trained_model), datamodule=dm)
        rows[cls] = torch.nonzero(callback.mask.masks["fc2.weight"].any(dim=1)).flatten().tolist()
        assert callback.resolved_config.head_rows == [cls]
    assert rows == {3: [3], 7: [7]}  # the class-3 mask and head row were reused for class 7


def test_a_checkpoint_of_another_request_is_refused(trained_model, digits, class3_dm, tmp_path):
    settings = dict(early_stopping=False, max_steps=6, objective="retain")
    path, _ = _checkpoint(copy.deepcopy(trained_model), class3_dm, tmp_path, 2, **settings)
    class7 = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[7]), batch_size=64)
    with pytest.raises(ValueError, match=r"checkpoint holds unlearning state of request \{'kind': 'class', 'classes': \[3\]\}"):
        _trainer(SelectiveUnlearning(log_metrics=False, **settings)).fit(
            copy.deepcopy(trained_model), datamodule=class7, ckpt_path=path)


# -- item 6: a non-finite repair is an error, not a success --------------------------------------------------------
def test_a_non_finite_repair_fails_instead_of_reporting_the_step_budget(trained_model, class3_dm):
    with pytest.raises(ValueError, match=r"unlearning stopped .*non-finite"):
        unlearn(trained_model, class3_dm, lr_scale=1e40, objective="retain", early_stopping=False, max_steps=5)


# -- item 7: layers the user froze ---------------------------------------------------------------------------------
def test_a_frozen_layer_is_neither_selected_nor_dampened(trained_model, class3_dm):
    trained_model.conv1.requires_grad_(False)
    original = {k: v.clone() for k, v in trained_model.state_dict().items()}
    result = unlearn(trained_model, class3_dm, max_steps=5, early_stopping=False)
    for name in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"):
        assert not result.mask.masks[name].any(), name  # recorded as trainable before
    for name in ("conv1.weight", "conv1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(result.model.state_dict()[name], original[name]), name  # dampened x0.1 before
    assert "conv1" not in result.mask.channels
    assert result.mask.masks["conv2.weight"].any()  # the other layers are still unlearned
    given = unlearn(trained_model, class3_dm, mask=ParameterMask.full(trained_model), max_steps=3, early_stopping=False)
    assert not given.mask.masks["conv1.weight"].any() and given.mask.masks["conv2.weight"].all()  # a given mask too
    assert torch.equal(given.model.conv1.weight, original["conv1.weight"])


# -- item 10: a resumed repair keeps its stopping history -----------------------------------------------------------
class EpochSeededData(UnlearningDataModule):
    """Retain batches shuffled by epoch number, so an interrupted run sees the same data order when resumed."""

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return DataLoader(self.retain_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(epoch))


def test_a_resumed_repair_stops_where_an_uninterrupted_one_stops(trained_model, digits, tmp_path):
    dm = EpochSeededData(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    settings = dict(objective="retain", reset="dampen", calibrate="none", check_every=5, patience=2, stop_tolerance=0.0,
                    max_steps=200)  # a repair that must forget by itself: the rule runs past the first epoch
    epoch = len(dm.retain_dataloader())
    whole = SelectiveUnlearning(log_metrics=False, **settings)
    _trainer(whole, reload_dataloaders_every_n_epochs=1).fit(copy.deepcopy(trained_model), datamodule=dm)
    assert whole.steps > epoch, "the interruption must fall inside the repair"

    first = SelectiveUnlearning(log_metrics=False, **settings)
    interrupted = _trainer(first, reload_dataloaders_every_n_epochs=1, max_steps=epoch)
    interrupted.fit(copy.deepcopy(trained_model), datamodule=dm)
    path = tmp_path / "epoch.ckpt"
    interrupted.save_checkpoint(path)
    resumed = SelectiveUnlearning(log_metrics=False, **settings)
    _trainer(resumed, reload_dataloaders_every_n_epochs=1).fit(copy.deepcopy(trained_model), datamodule=dm,
                                                               ckpt_path=path)
    assert (resumed.steps, str(resumed.stop_reason)) == (whole.steps, str(whole.stop_reason))
    assert resumed.stopping_history == whole.stopping_history  # the checks before the interruption included


# -- item 13: gradient accumulation -------------------------------------------------------------------------------
def test_with_gradient_accumulation_checks_follow_optimizer_steps(trained_model, class3_dm):
    callback = SelectiveUnlearning(log_metrics=False, objective="retain", reset="dampen", calibrate="none", check_every=1,
                                   patience=50, max_steps=4, stop_tolerance=0.0)
    _trainer(callback, accumulate_grad_batches=2).fit(trained_model, datamodule=class3_dm)
    steps = [row["step"] for row in callback.stopping_history]
    assert steps == list(range(1, len(steps) + 1)) and steps  # a check ran at step 0, before any update


def test_non_finite_batchnorm_statistics_are_caught_and_other_buffers_ignored(trained_model):
    from lightning_unlearn.repair import NonFiniteError, check_finite

    trained_model.register_buffer("attention_mask", torch.tensor([0.0, float("-inf")]))  # infinite on purpose
    check_finite(trained_model, "here")
    trained_model.bn2.running_var[0] = float("nan")
    with pytest.raises(NonFiniteError, match="unlearning stopped here: bn2.running_var holds non-finite values"):
        check_finite(trained_model, "here")
