"""The demo's attack verdict: U-LiRA on a small population, printed, or skipped with the reason."""
from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import Subset

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.cli import run_demo
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.evidence.verdict import class_calibrated, population_verdict, verdict_cost
from lightning_unlearn.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 3


@pytest.fixture(scope="module")
def small_dm(digits):
    train, test = digits
    return UnlearningDataModule(Subset(train, list(range(400))), Subset(test, list(range(200))),
                                ForgetRequest(classes=[3]), batch_size=64)


def _trained(dm, seed=0):
    from lightning_unlearn._training import fit
    from lightning_unlearn.demo import _AllTrainData

    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    fit(model, _AllTrainData(dm.train_dataset, dm.batch_size), EPOCHS)
    return model.eval()


def test_verdict_of_no_unlearning_is_the_original(small_dm):
    """An 'unlearning' that returns the original scores exactly the original's AUC, and an auditor tells it apart
    from retraining (the retrained models never saw class 3)."""
    from lightning_unlearn import retrain

    original = _trained(small_dm)
    retrained = retrain(original, small_dm, epochs=EPOCHS).model
    verdict = population_verdict(original, original, retrained, small_dm, EPOCHS, lambda m: m, k=3)
    assert verdict.k == 3 and verdict.halves_raw is None  # 3 models cannot be split into two halves of 3
    assert verdict.unlearned_raw == verdict.original_raw and verdict.unlearned_cal == verdict.original_cal
    assert verdict.original_raw > 0.9
    assert verdict.words == "an auditor tells it from retraining"
    lo, hi = verdict.pair_range
    assert 0.0 <= lo <= hi <= 1.0
    assert "K=3" in verdict.line() and f"{verdict.original_raw:.2f}" in verdict.line()


def test_class_calibration_subtracts_the_models_heldout_mean_per_class():
    phi = torch.tensor([[1.0, 2.0, 5.0], [0.0, 0.0, 0.0]]).numpy()
    held = torch.tensor([[1.0, 3.0, 10.0], [2.0, 2.0, 2.0]]).numpy()
    out = class_calibrated(phi, torch.tensor([3, 3, 5]).numpy(), held, torch.tensor([3, 3, 5]).numpy())
    assert out.tolist() == [[-1.0, 0.0, -5.0], [-2.0, -2.0, -2.0]]
    with pytest.raises(ValueError, match="no held-out samples of class 5"):
        class_calibrated(phi, torch.tensor([3, 3, 5]).numpy(), held, torch.tensor([3, 3, 4]).numpy())


def test_demo_prints_the_verdict(small_dm, capsys):
    pl.seed_everything(0, verbose=False)
    run_demo(SmallCNN(), small_dm, EPOCHS, UnlearnConfig(), attack=True, attack_models=3, attack_limit_s=1e6)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("attack verdict"))
    m = re.search(r"AUC (\d\.\d\d) raw / (\d\.\d\d) class-calibrated, original (\d\.\d\d) / (\d\.\d\d)", line)
    assert m, line
    assert all(0.0 <= float(v) <= 1.0 for v in m.groups())
    assert "K=3" in line and "0.5 = indistinguishable" in line and "Noisy at K=3" in line


def test_demo_skips_the_verdict_over_its_limit_and_says_why(small_dm, capsys):
    pl.seed_everything(0, verbose=False)
    run_demo(SmallCNN(), small_dm, EPOCHS, UnlearnConfig(), attack=True, attack_models=4, attack_limit_s=0.0)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("attack verdict"))
    assert line.startswith("attack verdict skipped: K=4 populations need 6 more trainings")
    assert "over the 0s limit" in line


def test_the_verdict_is_skipped_when_the_test_set_lacks_a_forget_class(digits):
    from lightning_unlearn.demo import attack_verdict

    train, test = digits
    no_threes = [i for i in range(len(test)) if int(test.tensors[1][i]) != 3]
    threes = [i for i in range(len(train)) if int(train.tensors[1][i]) == 3][:5]
    dm = UnlearningDataModule(train, Subset(test, no_threes), ForgetRequest(sample_ids=threes + [0]), batch_size=64,
                              num_classes=10)
    line = attack_verdict({}, dm, EPOCHS, UnlearnConfig(), 3, 1e6)
    assert line == ("attack verdict skipped: the test set has no samples of class(es) [3] to calibrate the forget "
                    "samples against")


def test_demo_without_attack_prints_no_verdict(small_dm, capsys):
    pl.seed_everything(0, verbose=False)
    run_demo(SmallCNN(), small_dm, EPOCHS, UnlearnConfig(), attack=False)
    assert "attack verdict" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [2, True, 3.5])
def test_demo_rejects_a_population_too_small_before_any_work(small_dm, bad):
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"attack_models must be an integer >= 3.*got {bad!r}"):
        run_demo(model, small_dm, EPOCHS, UnlearnConfig(), attack_models=bad)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing trained


def test_verdict_cost_counts_the_trainings_it_adds():
    assert verdict_cost(6, retrain_s=3.0, unlearn_s=0.5) == 5 * (2 * 3.0 + 0.5)


def test_cli_demo_rejects_a_bad_population_size_with_exit_2(capsys, tmp_path, monkeypatch):
    from lightning_unlearn.cli import main

    monkeypatch.chdir(tmp_path)
    config = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "digits_cnn.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--config", config, "--attack_models", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-unlearn: error: attack_models must be an integer >= 3") and "got 2" in err[-1]
