"""A repair under the default interrupted at an epoch boundary by the Trainer's own max_steps
and resumed from its checkpoint must end where the uninterrupted one ends (invariant 7).
The interrupted fit calibrates the head at on_train_end and the checkpoint holds calibrated rows: the resumed
repair must continue from the rows as the repair left them."""
import copy


from lightning_unlearn import ForgetRequest
from lightning_unlearn.callbacks import SelectiveUnlearning
from tests.test_callback_resume import EpochSeededData, _trainer


def test_a_resumed_default_repair_stops_where_an_uninterrupted_one_stops(trained_model, digits, tmp_path, one_thread):
    dm = EpochSeededData(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    settings = dict(check_every=5, patience=6, stop_tolerance=0.0, max_steps=200, lr_scale=5.0)  # the default procedure
    epoch = len(dm.retain_dataloader())
    whole_model = copy.deepcopy(trained_model)
    whole = SelectiveUnlearning(log_metrics=False, **settings)
    _trainer(whole, reload_dataloaders_every_n_epochs=1).fit(whole_model, datamodule=dm)
    assert whole.resolved_config.calibrate == "head" and whole.steps > epoch, "the interruption must fall inside"
    first = SelectiveUnlearning(log_metrics=False, **settings)
    interrupted = _trainer(first, reload_dataloaders_every_n_epochs=1, max_steps=epoch)
    interrupted.fit(copy.deepcopy(trained_model), datamodule=dm)
    path = tmp_path / "epoch.ckpt"
    interrupted.save_checkpoint(path)
    resumed_model = copy.deepcopy(trained_model)
    resumed = SelectiveUnlearning(log_metrics=False, **settings)
    _trainer(resumed, reload_dataloaders_every_n_epochs=1).fit(resumed_model, datamodule=dm, ckpt_path=path)
    before = [row for row in whole.stopping_history if row["step"] <= epoch]
    assert resumed.stopping_history[:len(before)] == before  # the checks before the interruption, kept
    after = [row for row in resumed.stopping_history[len(before):-1]]
    # the resumed repair sees the head as the repair left it, not the interrupted fit's calibrated rows (which
    # read forget accuracy 0.0 at every check after the interruption); it calibrates again at its own end
    assert after and all(row["forget_acc"] > 0.2 for row in after), after
    assert str(resumed.stop_reason) == str(whole.stop_reason)
    assert resumed.stopping_history[-1]["forget_acc"] == whole.stopping_history[-1]["forget_acc"] == 0.0
