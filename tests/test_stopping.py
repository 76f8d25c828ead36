"""Remove, then repair: the step budget, the evidence-based stopping rule and exact freezing under the defaults."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_unlearn import ForgetRequest, UnlearnConfig, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.config import AUTO_STEPS_MAX, AUTO_STEPS_MIN, auto_max_steps
from lightning_unlearn.repair.stopping import CheckSets, StoppingRule, StopReason


# -- the rule on its own -----------------------------------------------------------------------------------
def test_rule_stops_once_forgotten_and_recovered():
    rule = StoppingRule(reference=0.95, tolerance=0.01, patience=3)
    assert rule.update(5, forget_acc=0.40, forget_target=0.0, remaining_acc=0.80) is None
    assert rule.update(10, forget_acc=0.005, forget_target=0.0, remaining_acc=0.93) is None  # forgotten, not repaired
    assert rule.update(15, forget_acc=0.0, forget_target=0.0, remaining_acc=0.941) == "forgotten and recovered"
    assert [c.forgotten for c in rule.history] == [False, True, True]
    assert [c.recovered for c in rule.history] == [False, False, True]
    assert rule.rows()[-1]["step"] == 15 and rule.rows()[-1]["reason"] == "forgotten and recovered"


def test_rule_gives_up_after_patience_checks_without_progress():
    rule = StoppingRule(reference=0.95, tolerance=0.01, patience=2)
    assert rule.update(5, 0.0, 0.0, 0.90) is None
    assert rule.update(10, 0.0, 0.0, 0.90) is None  # no progress 1
    assert rule.update(15, 0.0, 0.0, 0.89) == "plateau"  # no progress 2


def test_falling_forget_accuracy_counts_as_progress_until_forgotten():
    rule = StoppingRule(reference=0.95, tolerance=0.01, patience=2)
    for step, forget in ((5, 0.9), (10, 0.7), (15, 0.5), (20, 0.3)):
        assert rule.update(step, forget, 0.0, 0.95) is None  # remaining flat, forgetting still moving
    assert rule.update(25, 0.3, 0.0, 0.95) is None
    assert rule.update(30, 0.3, 0.0, 0.95) == "plateau"


def test_sample_requests_aim_at_held_out_accuracy_and_flag_over_forgetting():
    rule = StoppingRule(reference=0.97, tolerance=0.01, patience=3)
    assert rule.update(5, forget_acc=1.00, forget_target=0.96, remaining_acc=0.97) is None  # still memorised
    assert rule.update(10, forget_acc=0.965, forget_target=0.96, remaining_acc=0.97) == "forgotten and recovered"
    over = StoppingRule(reference=0.97, tolerance=0.01, patience=3)
    over.update(5, forget_acc=0.50, forget_target=0.96, remaining_acc=0.97)
    assert over.history[-1].over_forgotten and over.history[-1].forgotten


# -- the budget ---------------------------------------------------------------------------------------------
def test_auto_budget_is_two_epochs_clamped_so_it_stops_growing_with_the_data():
    assert auto_max_steps(3) == AUTO_STEPS_MIN == 10  # a tiny retain set still gets a repair
    assert auto_max_steps(10) == 20  # two epochs: no floor above what a small data set's training costs
    assert auto_max_steps(70) == 140
    assert auto_max_steps(844) == auto_max_steps(100_000) == AUTO_STEPS_MAX
    assert UnlearnConfig().step_budget(70) == 140 and UnlearnConfig(max_steps=7).step_budget(40) == 7
    assert UnlearnConfig().check_interval(100) == 10 and UnlearnConfig().check_interval(200) == 20
    assert UnlearnConfig(check_every=3).check_interval(200) == 3
    # never more than two epochs once the retain set has AUTO_STEPS_MIN / 2 batches; checks scale with the budget
    assert all(auto_max_steps(n) <= 2 * n for n in range(AUTO_STEPS_MIN // 2, 2000))
    assert all(auto_max_steps(n) // UnlearnConfig().check_interval(auto_max_steps(n)) <= 10 for n in range(1, 2000))


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=None, max_steps=None), "epochs and max_steps are both None"),
    (dict(stop_tolerance=1.0), "stop_tolerance must be a finite number >= 0 and < 1, got 1.0"),
    (dict(patience=0), "patience must be an integer >= 1, got 0"),
    (dict(check_every="often"), "check_every must be an integer >= 1, got 'often'"),
    (dict(early_stopping="yes"), "early_stopping must be true or false, got 'yes'"),
])
def test_bad_stopping_settings_fail_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig(**bad)


def test_federated_engine_budgets_one_local_epoch_per_round():
    cfg = UnlearnConfig().resolved(ForgetRequest(classes=[3]), "federated")
    assert cfg.epochs == 1 and cfg.max_steps is None and cfg.reset == "none"  # class: no reset, then the calibration


def test_auto_resolves_per_request_kind_centrally():
    """Class requests: no reset, a retain-only repair, then the head calibration; sample requests: the held-out
    target without a reset (the population benchmark's best measured rows)."""
    cls = UnlearnConfig().resolved(ForgetRequest(classes=[3]))
    assert (cls.objective, cls.reset, cls.calibrate) == ("retain", "none", "head")
    smp = UnlearnConfig().resolved(ForgetRequest(sample_ids=[1, 2]))
    assert (smp.objective, smp.reset, smp.calibrate) == ("heldout", "none", "none")


def test_a_deferred_forgetting_stops_once_recovered_and_the_final_check_is_real():
    rule = StoppingRule(0.9, tolerance=0.01, patience=3, forgetting_deferred=True)
    assert rule.update(5, forget_acc=0.95, forget_target=0.0, remaining_acc=0.95) == StopReason.RECOVERED
    assert rule.history[-1].forgotten is False  # the row records what was measured
    rule.forgetting_deferred = False  # after the calibration: the real verdict
    assert rule.update(5, forget_acc=0.0, forget_target=0.0, remaining_acc=0.95) == StopReason.FORGOTTEN_AND_RECOVERED


# -- the callback on a real fit ------------------------------------------------------------------------------
def test_without_the_rule_the_fit_runs_exactly_the_step_budget(trained_model, class3_dm, one_thread):
    exact = unlearn(trained_model, class3_dm, early_stopping=False, max_steps=7)
    assert exact.extra["steps"] == 7 and exact.extra["stop_reason"] == "step budget" and exact.extra["stopping"] == []
    auto = unlearn(trained_model, class3_dm, early_stopping=False)
    assert auto.extra["steps"] == auto_max_steps(len(class3_dm.retain_dataloader()))


def test_callback_stops_a_generous_trainer_on_evidence(trained_model, class3_dm, one_thread):
    """``SelectiveUnlearning()`` on a Trainer with 1000 epochs stops by itself, every check logged; the default
    (a class request: head calibration after the repair) checks once more after the calibration, at the same step."""
    callback = SelectiveUnlearning(log_metrics=False)
    fit(trained_model.train(), class3_dm, 1000, [callback])
    history = callback.stopping_history
    budget = auto_max_steps(len(class3_dm.retain_dataloader()))
    assert callback.steps <= budget and history, "the rule never checked"
    assert callback.resolved_config.calibrate == "head" and "calibration" in callback.timings
    interval = UnlearnConfig().check_interval(budget)
    during, final = [row["step"] for row in history[:-1]], history[-1]
    assert during == list(range(interval, callback.steps + 1, interval)) and final["step"] == callback.steps
    assert callback.stop_reason in ("recovered (the calibration forgets)", "forgotten and recovered", "plateau",
                                    "step budget")
    if callback.stop_reason in ("recovered (the calibration forgets)", "forgotten and recovered"):
        assert final["forgotten"] and final["recovered"]  # measured on the calibrated model the fit returns
        assert final["forget_acc"] <= 0.01 and final["remaining_acc"] >= final["remaining_reference"] - 0.01


def test_check_sets_use_held_out_data_and_the_forget_sets_class_mix(digits):
    train, test = digits
    ids = np.random.default_rng(0).choice(len(train), 120, replace=False).tolist()
    dm = UnlearningDataModule(train, test, ForgetRequest(sample_ids=ids), batch_size=64)
    sets = CheckSets(dm, max_samples=100, seed=0)
    assert set(sets.forget.indices) <= set(ids) and len(sets.remaining) == 100
    assert torch.isclose(sets.forget_class_weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    class_dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=64)
    class_sets = CheckSets(class_dm, max_samples=100, seed=0)
    assert class_sets.forget.dataset is test and all(int(class_dm.test_targets[i]) == 3 for i in class_sets.forget.indices)


def test_sample_request_stops_near_held_out_accuracy_not_zero(trained_model, digits, one_thread):
    train, test = digits
    ids = np.random.default_rng(0).choice(len(train), len(train) // 10, replace=False).tolist()
    dm = UnlearningDataModule(train, test, ForgetRequest(sample_ids=ids), batch_size=64)
    result = unlearn(trained_model, dm)
    targets = [row["forget_target"] for row in result.extra["stopping"]]
    assert targets and min(targets) > 0.8, "a sample request aims at held-out accuracy, not 0"
    assert result.config.objective == "heldout" and result.metrics["forget_acc"] > 0.8


def test_default_procedure_leaves_everything_outside_the_mask_bit_exact(trained_model, class3_dm, one_thread):
    params = {n: p.detach().clone() for n, p in trained_model.named_parameters()}
    buffers = {n: b.clone() for n, b in trained_model.named_buffers()}
    result = unlearn(trained_model, class3_dm)
    assert (result.config.reset, result.config.calibrate) == ("none", "head") and "calibration" in result.timings_s
    changed = 0
    for name, p in result.model.named_parameters():
        keep = result.mask.masks[name]
        assert torch.equal(p[~keep], params[name][~keep]), name
        changed += int((p[keep] != params[name][keep]).sum())
    assert changed > 0
    for name, bn in result.model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            sel = result.mask.masks[f"{name}.weight"]
            assert torch.equal(bn.running_mean[~sel], buffers[f"{name}.running_mean"][~sel])
            assert torch.equal(bn.running_var[~sel], buffers[f"{name}.running_var"][~sel])
            assert torch.equal(bn.num_batches_tracked, buffers[f"{name}.num_batches_tracked"])


def test_the_forget_term_pauses_once_held_out_data_shows_the_class_forgotten(trained_model, class3_dm, one_thread):
    """random_label is the means to forget; after a check shows the class gone, only the repair goes on."""
    callback = SelectiveUnlearning(log_metrics=False, forget_weight=0.7, objective="random_label", reset="dampen",
                                   calibrate="none")
    fit(trained_model.train(), class3_dm, None, [callback])
    last = callback.stopping_history[-1]
    assert callback.resolved_config.objective == "random_label"
    assert trained_model.forget_weight == (0.0 if last["forgotten"] else 0.7)
    callback._pause_forget_term_once_forgotten(trained_model, forgotten=False)  # the class came back: resume
    assert trained_model.forget_weight == 0.7


def test_the_budget_of_a_real_fit_scales_with_the_retain_set_and_never_exceeds_two_epochs(trained_model, digits,
                                                                                           one_thread):
    """Without the rule the fit runs exactly the auto budget: two epochs of the retain set's batches (10 at the
    least), so it grows with the data and a small retain set is never charged a fixed floor of many epochs."""
    from torch.utils.data import Subset

    steps = {}
    for n in (300, 700, len(digits[0])):
        dm = UnlearningDataModule(Subset(digits[0], list(range(n))), digits[1], ForgetRequest(classes=[3]),
                                  batch_size=64)
        batches = len(dm.retain_dataloader())
        result = unlearn(trained_model, dm, early_stopping=False, calibrate="none")
        assert result.extra["steps"] == auto_max_steps(batches) == max(AUTO_STEPS_MIN, 2 * batches), (n, batches)
        assert result.extra["steps"] <= 2 * batches  # these retain sets have >= 5 batches: no floor above 2 epochs
        steps[n] = result.extra["steps"]
    assert steps[300] < steps[700] < steps[len(digits[0])], steps
    assert steps[300] == AUTO_STEPS_MIN  # 5 retain batches: the floor is exactly two epochs here
