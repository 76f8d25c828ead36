"""Evaluation metrics on cases with a known answer, and their bad-input errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_unlearn._training import fit
from lightning_unlearn.evidence import evaluate_unlearning, relearn_time
from lightning_unlearn.evidence.backdoor import BackdoorDataset, attack_success_rate, choose_poison, stamp_trigger
from lightning_unlearn.metrics import ClassAccuracy, split_accuracies
from lightning_unlearn.evidence.gap import avg_gap, check_same_classes
from lightning_unlearn.evidence.membership import loss_attack_auc, mia_efficacy
from lightning_unlearn.evidence.probe import penultimate_features, probe_accuracy
from lightning_unlearn.evidence.evaluate import random_samples_request
from lightning_unlearn.models import SmallCNN

from conftest import FullTrainData


# -- accuracy ----------------------------------------------------------------------------------
def test_class_accuracy_known_counts_and_merge_like_ddp():
    target = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    preds = torch.tensor([0, 1, 1, 1, 2, 0, 0, 3])
    whole = ClassAccuracy(4, forget_classes=[2])
    whole.update(preds, target)
    out = whole.compute()
    assert out["per_class"] == [0.5, 1.0, pytest.approx(1 / 3), 1.0]
    assert out["forget_acc"] == pytest.approx(1 / 3)
    assert out["remaining_acc"] == pytest.approx(4 / 5)
    ref = MulticlassAccuracy(num_classes=4, average="micro")
    assert out["acc"] == pytest.approx(float(ref(preds, target)))
    # two "ranks" see half each; summing the count states (what DDP does) gives the same numbers
    a, b = ClassAccuracy(4, [2]), ClassAccuracy(4, [2])
    a.update(F.one_hot(preds[:4], 4).float(), target[:4])  # logits work as well as labels
    b.update(preds[4:], target[4:])
    a.merge_state(b)
    assert a.compute() == out


def test_class_accuracy_bad_forget_class():
    with pytest.raises(ValueError, match=r"forget class\(es\) \[12\].*0\.\.9"):
        ClassAccuracy(10, forget_classes=[12])


def test_split_accuracies_per_class(trained_model, class3_dm):
    out = split_accuracies(trained_model, class3_dm, per_class=True)
    per_class = out["per_class_test_acc"]
    assert len(per_class) == 10 and per_class[3] == pytest.approx(out["forget_test_acc"])
    assert out["test_acc"] > 0.9


# -- membership inference ----------------------------------------------------------------------
def _memoriser(digits, n: int = 96):
    """An MLP that memorised n digits with random labels (train loss ~0; no generalisation possible)."""
    x, _ = digits[0].tensors
    gen = torch.Generator().manual_seed(0)
    members = TensorDataset(x[:n], torch.randint(0, 10, (n,), generator=gen))
    nonmembers = TensorDataset(x[n : 2 * n], torch.randint(0, 10, (n,), generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(members.tensors[0]), members.tensors[1]).backward()
        opt.step()
    return model, members, nonmembers


def test_loss_attack_auc_memoriser_high_random_init_half(digits):
    model, members, nonmembers = _memoriser(digits)
    assert loss_attack_auc(model, members, nonmembers) > 0.9
    torch.manual_seed(1)
    fresh = SmallCNN()
    train, test = digits
    auc = loss_attack_auc(fresh, Subset(train, range(400)), Subset(test, range(400)))
    assert abs(auc - 0.5) < 0.1


def test_mia_efficacy_known_answers(digits):
    model, members, nonmembers = _memoriser(digits)
    seen = mia_efficacy(model, retain=members, test=nonmembers, forget=members)
    unseen = mia_efficacy(model, retain=members, test=nonmembers, forget=nonmembers)
    assert seen.informative and seen.shadow_acc > 0.8
    assert seen.efficacy < 0.2 and unseen.efficacy > 0.8
    assert "shadow acc" in str(seen)


def test_mia_flags_uninformative_shadow(digits):
    torch.manual_seed(1)
    fresh = SmallCNN()  # members and non-members look alike to an untrained model
    train, test = digits
    result = mia_efficacy(fresh, Subset(train, range(300)), Subset(test, range(300)), Subset(train, range(50)))
    assert result.shadow_acc < 0.55  # seeded: 0.52
    assert not result.informative and "uninformative" in str(result)


def test_mia_is_deterministic(trained_model, class3_dm):
    args = (trained_model, class3_dm.retain_set, class3_dm.test_dataset, class3_dm.forget_set)
    assert mia_efficacy(*args, max_samples=200, seed=3) == mia_efficacy(*args, max_samples=200, seed=3)


def test_mia_needs_two_classes_of_samples(trained_model, digits):
    train, test = digits
    empty = Subset(test, [])
    with pytest.raises(ValueError, match=r"2 classes \(members and non-members\).*0 non-member"):
        mia_efficacy(trained_model, Subset(train, range(50)), empty, Subset(train, range(10)))
    with pytest.raises(ValueError, match=r"2 classes.*0 member"):
        loss_attack_auc(trained_model, Subset(train, []), Subset(test, range(10)))


# -- backdoor ----------------------------------------------------------------------------------
def test_backdoor_wrapper_stamps_and_relabels(digits):
    train = digits[0]
    poisoned = BackdoorDataset(train, [5, 1, 5], target_class=0, size=2, value=1.0)
    assert poisoned.indices.tolist() == [1, 5]
    x, y = poisoned[5]
    assert int(y) == 0 and torch.all(x[..., -2:, -2:] == 1.0)
    assert torch.equal(poisoned[2][0], train[2][0])
    assert int(poisoned.targets[1]) == 0 and int(poisoned.targets[2]) == int(train.tensors[1][2])
    assert not torch.equal(stamp_trigger(train[0][0]), train[0][0])  # the corner of a digit is dark: the patch shows
    with pytest.raises(ValueError, match=r"poison index\(es\) \[5000\] out of range"):
        BackdoorDataset(train, [5000], target_class=0)


def test_backdoor_succeeds_only_on_the_model_trained_with_it(digits, trained_model):
    train, test = digits
    idx = choose_poison(train.tensors[1], 0.1, target_class=0, seed=0)
    poisoned = BackdoorDataset(train, idx, target_class=0)
    torch.manual_seed(0)
    model = SmallCNN()
    fit(model, FullTrainData(poisoned), epochs=10)
    assert attack_success_rate(model, test, target_class=0) > 0.8
    assert attack_success_rate(trained_model, test, target_class=0) < 0.2


# -- probe -------------------------------------------------------------------------------------
def test_probe_via_features_and_via_head_hook(trained_model, digits):
    test = digits[1]
    feats, labels = penultimate_features(trained_model, test)
    assert feats.shape == (len(test), 64) and labels.shape == (len(test),)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    hooked, _ = penultimate_features(seq, test)
    assert hooked.shape == (len(test), 32)
    result = probe_accuracy(trained_model, test, forget_classes=[3])
    assert result.forget_acc > 0.8 and result.overall_acc > 0.9
    with pytest.raises(ValueError, match="forgotten classes"):
        probe_accuracy(trained_model, test, forget_classes=[])


# -- retrain gap and relearn time --------------------------------------------------------------
def test_avg_gap_known_answer():
    u = {"forget_acc": 0.1, "remaining_acc": 0.9, "test_acc": 0.8, "mia_efficacy": 0.5}
    r = {"forget_acc": 0.0, "remaining_acc": 0.95, "test_acc": 0.8, "mia_efficacy": 0.7}
    assert avg_gap(u, r) == pytest.approx(100 * (0.1 + 0.05 + 0 + 0.2) / 4)
    with pytest.raises(ValueError, match=r"missing or None: \['mia_efficacy'\]"):
        avg_gap({**u, "mia_efficacy": None}, r)


def test_relearn_time_knowing_model_is_instant(trained_model, class3_dm):
    forget, retain = class3_dm.forget_set, class3_dm.retain_set
    assert relearn_time(trained_model, forget, retain, target_acc=0.9, num_classes=10) == 0
    torch.manual_seed(0)
    steps = relearn_time(SmallCNN(), forget, retain, target_acc=0.9, num_classes=10, max_steps=10)
    assert steps is None or steps > 0


def test_retrained_model_with_other_classes_is_refused(trained_model, class3_dm):
    wrong = SmallCNN(num_classes=9)
    with pytest.raises(ValueError, match="retrained model predicts 9 classes but the original predicts 10"):
        evaluate_unlearning(trained_model, copy.deepcopy(trained_model), class3_dm, retrained=wrong)
    x = class3_dm.train_dataset[0][0][None]
    check_same_classes(trained_model, copy.deepcopy(trained_model), x)  # same classes: no error


def test_forget_set_larger_than_training_set_is_refused():
    with pytest.raises(ValueError, match="forget set has 2000 samples but the training set only 1347"):
        random_samples_request(1347, count=2000)
    request = random_samples_request(1347, fraction=0.1, seed=4)
    assert len(request.sample_ids) == 135 and request == random_samples_request(1347, fraction=0.1, seed=4)
    with pytest.raises(ValueError, match="exactly one of fraction or count"):
        random_samples_request(1347)


def test_evaluate_unlearning_identical_models_have_zero_gap(trained_model, class3_dm):
    twin = copy.deepcopy(trained_model)
    out = evaluate_unlearning(trained_model, twin, class3_dm, retrained=copy.deepcopy(trained_model),
                              max_samples=300, relearn_max_steps=10)
    assert set(out) == {"original", "unlearned", "retrained", "comparison"}
    comp = out["comparison"]
    assert comp["avg_gap"] == 0.0 and comp["acc_gap"] == 0.0
    assert comp["relearn_steps_unlearned"] == 0 == comp["relearn_steps_retrained"]  # it never forgot
    assert out["unlearned"]["forget_acc"] > 0.9 and "probe_forget_acc" in out["unlearned"]
