"""A module's own per-step scheduler sized by ``trainer.estimated_stepping_batches`` (Lightning's documented way)
sees the repair's step budget: the callback gives the Trainer its budget before ``configure_optimizers`` runs."""
from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import Subset

from lightning_unlearn import ForgetRequest, UnlearnConfig, unlearn
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.commands import CentralEngine
from lightning_unlearn.config import auto_max_steps
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")


class OneCycleCNN(SmallCNN):
    """AdamW with a OneCycle schedule over every optimizer step the Trainer estimates."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3,
                                                            total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.schedule, "interval": "step"}}


class StepLRCNN(SmallCNN):
    """SGD halved every epoch: a per-epoch schedule that needs no step count."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        self.schedule = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
        return [opt], [self.schedule]


def _as(cls, trained_model):
    model = cls()
    model.load_state_dict(trained_model.state_dict())
    return model


@pytest.fixture
def small_dm(digits):
    """600 training digits: 9 retain batches of 64 for a class request, an auto budget of 18 steps."""
    return UnlearningDataModule(Subset(digits[0], range(600)), digits[1], ForgetRequest(classes=[3]), batch_size=64)


def _frozen_unchanged(before: pl.LightningModule, result) -> bool:
    after = dict(result.model.named_parameters())
    return all(torch.equal(p[~result.mask.masks[n]], after[n][~result.mask.masks[n]])
               for n, p in before.named_parameters())


def test_a_one_cycle_schedule_unlearns_at_defaults_and_spans_the_budget(trained_model, small_dm):
    model = _as(OneCycleCNN, trained_model)
    result = unlearn(model, small_dm)
    budget = result.extra["step_budget"]
    assert budget == auto_max_steps(len(small_dm.retain_dataloader()))
    assert result.model.schedule.total_steps == budget
    assert 0 < result.extra["steps"] <= budget and result.model.schedule.last_epoch == result.extra["steps"]
    assert _frozen_unchanged(model, result)


def test_a_one_cycle_schedule_runs_the_whole_budget_without_stepping_past_it(trained_model, small_dm):
    model = _as(OneCycleCNN, trained_model)
    result = unlearn(model, small_dm, early_stopping=False, max_steps=12, trainer_kwargs={"accumulate_grad_batches": 2})
    assert result.extra["step_budget"] == result.model.schedule.total_steps == result.extra["steps"] == 12
    assert result.extra["stop_reason"] == "step budget" and result.model.schedule.last_epoch == 12
    assert _frozen_unchanged(model, result)


def test_with_epochs_and_no_step_cap_the_schedule_spans_the_epochs(trained_model, small_dm):
    result = unlearn(_as(OneCycleCNN, trained_model), small_dm, early_stopping=False, max_steps=None, epochs=2)
    assert result.extra["step_budget"] is None
    assert result.model.schedule.total_steps == result.extra["steps"] == 2 * len(small_dm.retain_dataloader())


def test_the_cli_engine_gives_its_trainer_the_budget(trained_model, small_dm):
    """``lightning-unlearn unlearn`` runs :class:`CentralEngine` on the user's (training) Trainer."""
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    model = _as(OneCycleCNN, trained_model)
    result = CentralEngine(trainer, seed=0).unlearn(model, small_dm, UnlearnConfig(early_stopping=False))
    assert result.model.schedule.total_steps == result.extra["step_budget"] == result.extra["steps"] == 18
    assert trainer.max_steps == -1  # the user's Trainer is left as it was built


@pytest.mark.parametrize("limits", [{}, {"max_epochs": -1}, {"max_epochs": 50}])
def test_the_drop_in_callback_fills_an_unset_max_steps(trained_model, small_dm, limits):
    callback = SelectiveUnlearning(log_metrics=False, early_stopping=False, max_steps=10)
    trainer = pl.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **limits)
    model = _as(OneCycleCNN, trained_model)
    trainer.fit(model, datamodule=small_dm)
    assert callback.step_budget == model.schedule.total_steps == callback.steps == 10
    assert trainer.max_steps == -1


def test_a_max_steps_set_on_the_trainer_is_kept(trained_model, small_dm):
    callback = SelectiveUnlearning(log_metrics=False, early_stopping=False, max_steps=10)
    trainer = pl.Trainer(callbacks=[callback], max_steps=6, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = _as(OneCycleCNN, trained_model)
    trainer.fit(model, datamodule=small_dm)
    assert model.schedule.total_steps == callback.steps == trainer.max_steps == 6
    assert str(callback.stop_reason) == "trainer"


def test_a_per_epoch_step_lr_keeps_working(trained_model, small_dm):
    model = _as(StepLRCNN, trained_model)
    result = unlearn(model, small_dm, early_stopping=False, max_steps=20)  # 9 batches an epoch: two epochs end
    assert result.extra["steps"] == 20 and result.model.schedule.last_epoch == 2
    assert _frozen_unchanged(model, result)


class Interrupt(pl.Callback):
    """Write a checkpoint after ``step`` optimizer steps, then fail: a repair cut off by a crash."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise RuntimeError("interrupted")


def test_a_resumed_one_cycle_repair_steps_to_the_budget_and_not_past_it(trained_model, small_dm, tmp_path):
    settings = dict(log_metrics=False, early_stopping=False, max_steps=14)
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   max_epochs=-1)
    path = tmp_path / "interrupted.ckpt"
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer = pl.Trainer(callbacks=[SelectiveUnlearning(**settings), Interrupt(5, path)], **options)
        trainer.fit(_as(OneCycleCNN, trained_model), datamodule=small_dm)
    resumed = SelectiveUnlearning(**settings)
    model = _as(OneCycleCNN, trained_model)
    pl.Trainer(callbacks=[resumed], **options).fit(model, datamodule=small_dm, ckpt_path=path)
    assert resumed.steps == model.schedule.total_steps == model.schedule.last_epoch == 14
