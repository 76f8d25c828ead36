"""Per-example attacks, the challenge score and the reference cache, on known answers.

The known-answer case: random inputs with random labels. A model trained on them memorises
every training sample (nothing is learnable), so its confidence on the forget samples is far
above that of models that never saw them; a model retrained without them is no different
from the references.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import dumps_json, save_torch
from lightning_unlearn.evidence import attacks as A
from lightning_unlearn.evidence import references as R
from lightning_unlearn.models import ClassifierModule

N_TRAIN, N_FORGET, N_TEST, DIM, CLASSES = 400, 120, 400, 24, 10
EPOCHS = 40


class TinyMLP(ClassifierModule):
    def __init__(self, in_features: int = DIM, num_classes: int = CLASSES, hidden: int = 128, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def noise_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    make = lambda n: TensorDataset(torch.randn(n, DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g))  # noqa: E731
    return make(N_TRAIN), make(N_TEST)


def noise_dm(train, test, forget=range(N_FORGET)) -> UnlearningDataModule:
    return UnlearningDataModule(train, test, ForgetRequest(sample_ids=list(forget)), batch_size=100)


@pytest.fixture(scope="module")
def world(one_thread, tmp_path_factory):
    """5 originals (4 = population, 1 held out), 4 retrained models (the same recipe as references), one cache."""
    cache = tmp_path_factory.mktemp("refs")
    train, test = noise_data()
    dm = noise_dm(train, test)
    template = TinyMLP()
    originals = R.train_originals(template, dm, 5, EPOCHS, cache_dir=cache, progress=False).models
    retrained = R.unlearned_population(template, dm, _retrain_fn, "retrain", {"epochs": EPOCHS}, 4, EPOCHS,
                                       cache_dir=cache, progress=False).models
    return dict(cache=cache, dm=dm, template=template, originals=originals, retrained=retrained, train=train, test=test)


def _retrain_fn(model, dm, seed):
    return R._train_fresh(model, dm.retain_set, dm, EPOCHS, None, seed)


# -- statistics -----------------------------------------------------------------------
def test_logit_confidence_is_stable_log_odds():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor(logits))

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    data = TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1]))
    phi, correct = A.logit_confidence(Fixed([2.0, 0.0, -1.0]), data)
    p = torch.softmax(torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64), 0)
    expected = torch.log(p / (1 - p))[:2].numpy()
    np.testing.assert_allclose(phi, expected, rtol=1e-9)
    assert correct.tolist() == [True, False]
    phi_big, _ = A.logit_confidence(Fixed([1000.0, 0.0, 0.0]), data)  # p == 1 in float: no inf
    assert np.isfinite(phi_big).all() and phi_big[0] == pytest.approx(1000 - math.log(2))


def test_roc_result_reads_low_fpr_and_rejects_empty():
    r = A.roc_result(np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0, -1.0, -2.0]))
    assert r.auc == pytest.approx(11 / 12) and r.tpr_at_1pct_fpr == pytest.approx(2 / 3)
    assert r.to_dict()["tpr_at_0.1pct_fpr"] == pytest.approx(2 / 3) and r.min_resolvable_fpr == 0.25
    with pytest.raises(ValueError, match="positives and negatives"):
        A.roc_result(np.array([]), np.array([1.0]))


def test_gaussian_fit_pools_variance_below_64_models():
    stats = np.array([[0.0, 0.0], [2.0, 10.0]])
    mu, sd = A.gaussian_fit(stats, "auto")
    np.testing.assert_allclose(mu, [1.0, 5.0])
    np.testing.assert_allclose(sd, [np.sqrt((2 + 50) / 2)] * 2)
    np.testing.assert_allclose(A.gaussian_fit(stats, "per_example")[1], [np.sqrt(2), np.sqrt(50)])
    with pytest.raises(ValueError, match="allowed values"):
        A.gaussian_fit(stats, "local")
    with pytest.raises(ValueError, match="at least 2 models"):
        A.gaussian_fit(stats[:1])


# -- attacks on known answers -----------------------------------------------------------
def test_offline_lira_detects_memorised_set_and_not_a_retrained_model(world):
    dm = world["dm"]
    refs = R.train_references(world["template"], dm, 4, EPOCHS, cache_dir=world["cache"], progress=False).models
    forget = Subset(world["train"], dm.forget_indices.tolist())
    heldout = Subset(world["test"], A.matched_heldout(dm.test_targets, dm.train_targets[dm.forget_indices].numpy()).tolist())
    res = A.offline_attack({"memorised": world["originals"][4], "retrained": world["retrained"][0]}, refs, forget, heldout)
    assert res["memorised"].auc > 0.95 and res["memorised"].tpr_at_1pct_fpr > 0.3
    assert 0.4 < res["retrained"].auc < 0.6


def test_ulira_unlearned_vs_retrained(world):
    dm = world["dm"]
    refs = R.train_references(world["template"], dm, 4, EPOCHS, cache_dir=world["cache"], progress=False).models
    forget = Subset(world["train"], dm.forget_indices.tolist())
    # "unlearning" that changes nothing: every original is told from every retrained model
    assert A.ulira_attack(world["originals"][:4], refs, forget).auc > 0.95
    # two populations of retrained models: chance
    assert 0.4 < A.ulira_attack(world["retrained"], refs, forget).auc < 0.6
    with pytest.raises(ValueError, match="at least 3 models"):
        A.ulira_attack(world["retrained"][:2], refs, forget)


def test_attack_evidence_end_to_end(world):
    dm = world["dm"]
    out = A.attack_evidence(world["originals"][4], world["retrained"][0], dm, references=4, epochs=EPOCHS,
                            cache_dir=world["cache"], progress=False, retain_sample=60)
    u = out["ulira"]
    json.loads(dumps_json(out))  # JSON-able as the CLI writes it
    assert u["informative"] and u["per_model"]["original"]["auc"] > 0.95
    assert u["forget"] == u["per_model"]["unlearned"] and 0.4 < u["forget"]["auc"] < 0.6
    assert u["references"] == 4 and u["variance"] == "global" and "offline LiRA" in u["variant"]
    exposure = u["retain_exposure"]
    assert exposure["num_audited"] == 28  # 10% of the 280 retain points, although 60 were asked for
    # audit points are members of both models and of no reference: both detect them
    assert exposure["before"]["auc"] > 0.9 and exposure["after"]["auc"] > 0.9
    lo, hi = exposure["auc_change_ci95"]
    assert lo <= exposure["auc_change"] <= hi and exposure["more_exposed"] == (lo > 0)


def test_retain_exposure_flags_a_clear_increase():
    rng = np.random.default_rng(0)
    n = 200
    before = rng.normal(size=2 * n)
    after = before.copy()
    after[:n] += 2.0  # members now stand out
    out = A.retain_exposure(before, after, n, seed=0, rounds=300)
    assert out["more_exposed"] and out["auc_change_ci95"][0] > 0.3
    same = A.retain_exposure(before, before, n, seed=0, rounds=300)
    assert not same["more_exposed"] and same["auc_change"] == 0


def test_attack_evidence_fails_fast(tmp_path, world):
    dm, m = world["dm"], world["originals"][0]
    for kwargs, match in [
        (dict(attack="lira"), "allowed attacks are"),
        (dict(references=1), "references must be"),
        (dict(variance="local"), "allowed values"),
        (dict(epochs=0), "epochs must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            A.attack_evidence(m, m, dm, cache_dir=tmp_path / "c", progress=False, **{"references": 2, **kwargs})
    assert not (tmp_path / "c" / "reference").exists() or not any((tmp_path / "c" / "reference").rglob("*.pt"))


# -- the challenge score --------------------------------------------------------------
def test_challenge_epsilon_known_values():
    r = np.array([[0.0], [1.0], [2.0], [3.0]])
    u = r + 2.0
    eps = A.per_example_epsilon(u, r)
    assert eps[0] == pytest.approx(math.log(0.74 / 0.25))  # best threshold: FPR = FNR = 1/4
    assert A.forget_quality(eps) == pytest.approx(2 / 2**3)  # epsilon in [1.0, 1.5): bucket 3


def test_challenge_identical_populations_score_max_and_separable_min():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(16, 50))
    same = A.challenge_score(r.copy(), r, 0.9, 0.9, 0.8, 0.8)
    assert same["forget_score"] == 1.0 and same["final_score"] == 1.0 and same["epsilon_median"] == 0.0
    apart = A.challenge_score(r + 100.0, r, 0.9, 0.9, 0.8, 0.8)
    assert apart["forget_score"] == pytest.approx(2 / 2**13) and apart["epsilon_infinite_fraction"] == 1.0
    below = A.challenge_score(r - 100.0, r, 0.9, 0.9, 0.8, 0.8)  # separable the other way: caught too
    assert below["forget_score"] == pytest.approx(2 / 2**13)
    utility = A.challenge_score(r.copy(), r, 0.45, 0.9, 0.4, 0.8)
    assert utility["final_score"] == pytest.approx(0.25)


def test_challenge_score_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 models"):
        A.per_example_epsilon(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same examples"):
        A.per_example_epsilon(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="delta"):
        A.per_example_epsilon(np.zeros((4, 3)), np.zeros((4, 3)), delta=1.5)


def test_population_challenge_score_on_models(world):
    dm = world["dm"]
    forget = Subset(world["train"], dm.forget_indices.tolist())
    retain, test = dm.retain_set, world["test"]
    unchanged = A.population_challenge_score(world["originals"][:4], world["retrained"], forget, retain, test)
    refs = R.train_references(world["template"], dm, 4, EPOCHS, cache_dir=world["cache"], progress=False).models
    exact = A.population_challenge_score(refs[:2], world["retrained"], forget, retain, test)
    assert unchanged["forget_score"] < 0.05  # memorised labels: every example is separable
    assert exact["forget_score"] > unchanged["forget_score"] + 0.3


def test_tug_of_war():
    r = {"forget_train_acc": 0.2, "retain_train_acc": 1.0, "test_acc": 0.9}
    assert A.tug_of_war(r, r) == 1.0
    u = {"forget_train_acc": 0.7, "retain_train_acc": 0.9, "test_acc": 0.9}
    assert A.tug_of_war(u, r) == pytest.approx(0.5 * 0.9)
    with pytest.raises(ValueError, match="missing or None"):
        A.tug_of_war({"forget_train_acc": 0.1}, r)


# -- the reference cache --------------------------------------------------------------
@pytest.fixture
def counted_fit(monkeypatch):
    calls = []
    real = R.fit

    def fit(model, datamodule, epochs, callbacks=(), trainer_kwargs=None):
        calls.append(epochs)
        return real(model, datamodule, epochs, callbacks, trainer_kwargs)

    monkeypatch.setattr(R, "fit", fit)
    return calls


def test_cache_hit_trains_nothing(tmp_path, counted_fit, one_thread):
    train, test = noise_data(1)
    dm = noise_dm(train, test)
    first = R.train_references(TinyMLP(), dm, 2, 1, cache_dir=tmp_path, progress=False)
    assert first.trained == 2 and len(counted_fit) == 2
    again = R.train_references(TinyMLP(), noise_dm(*noise_data(1)), 2, 1, cache_dir=tmp_path, progress=False)
    assert again.trained == 0 and len(counted_fit) == 2 and again.key == first.key
    for a, b in zip(first.models, again.models):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    # members differ: each has its own seed
    assert not torch.equal(first.models[0].net[0].weight, first.models[1].net[0].weight)
    assert json.loads((first.folder / "key.json").read_text())["schedule"]["epochs"] == 1


def test_cache_miss_on_changed_split_hparams_schedule_or_data(tmp_path, counted_fit, one_thread):
    train, test = noise_data(1)
    base = R.train_references(TinyMLP(), noise_dm(train, test), 1, 1, cache_dir=tmp_path, progress=False).key
    changed = {
        "split": R.train_references(TinyMLP(), noise_dm(train, test, range(1, N_FORGET + 1)), 1, 1, cache_dir=tmp_path, progress=False),
        "hparam": R.train_references(TinyMLP(lr=5e-3), noise_dm(train, test), 1, 1, cache_dir=tmp_path, progress=False),
        "epochs": R.train_references(TinyMLP(), noise_dm(train, test), 1, 2, cache_dir=tmp_path, progress=False),
        "seed": R.train_references(TinyMLP(), noise_dm(train, test), 1, 1, cache_dir=tmp_path, seed=1, progress=False),
        "exclude": R.train_references(TinyMLP(), noise_dm(train, test), 1, 1, cache_dir=tmp_path, exclude=[300], progress=False),
    }
    edited = TensorDataset(train.tensors[0].clone(), train.tensors[1])
    edited.tensors[0][399, 0] += 1.0  # one value of one retained sample
    changed["data"] = R.train_references(TinyMLP(), noise_dm(edited, test), 1, 1, cache_dir=tmp_path, progress=False)
    keys = {name: pop.key for name, pop in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)
    assert all(pop.trained == 1 for pop in changed.values()) and len(counted_fit) == 1 + len(changed)


def test_cache_refuses_a_file_from_another_key(tmp_path, one_thread):
    train, test = noise_data(1)
    pop = R.train_references(TinyMLP(), noise_dm(train, test), 1, 1, cache_dir=tmp_path, progress=False)
    path = pop.folder / "reference_0.pt"
    save_torch({"key": "0" * 64, "index": 0, "seed": 0, "state_dict": pop.models[0].state_dict()}, path)
    with pytest.raises(ValueError, match="does not belong to cache key"):
        R.train_references(TinyMLP(), noise_dm(train, test), 1, 1, cache_dir=tmp_path, progress=False)


def test_indices_train_a_slice_and_validate(tmp_path, counted_fit, one_thread):
    dm = noise_dm(*noise_data(1))
    part = R.train_references(TinyMLP(), dm, 3, 1, cache_dir=tmp_path, indices=[2], progress=False)
    assert part.trained == 1 and len(part.models) == 1 and (part.folder / "reference_2.pt").exists()
    whole = R.train_references(TinyMLP(), dm, 3, 1, cache_dir=tmp_path, progress=False)
    assert whole.trained == 2 and len(counted_fit) == 3
    with pytest.raises(ValueError, match="allowed are 0..2"):
        R.train_references(TinyMLP(), dm, 3, 1, cache_dir=tmp_path, indices=[3], progress=False)
    with pytest.raises(ValueError, match="integer >= 1"):
        R.train_references(TinyMLP(), dm, 0, 1, cache_dir=tmp_path, progress=False)


def test_unlearned_population_cached_by_method_and_settings(tmp_path, one_thread):
    dm = noise_dm(*noise_data(1))
    calls = []

    def unlearn(model, datamodule, seed):
        calls.append(seed)
        return model

    a = R.unlearned_population(TinyMLP(), dm, unlearn, "noop", {"x": 1}, 2, 1, cache_dir=tmp_path, progress=False)
    b = R.unlearned_population(TinyMLP(), dm, unlearn, "noop", {"x": 1}, 2, 1, cache_dir=tmp_path, progress=False)
    c = R.unlearned_population(TinyMLP(), dm, unlearn, "noop", {"x": 2}, 2, 1, cache_dir=tmp_path, progress=False)
    assert (a.trained, b.trained, c.trained) == (2, 0, 2) and len(calls) == 4 and a.key == b.key != c.key
    originals = R.train_originals(TinyMLP(), dm, 2, 1, cache_dir=tmp_path, progress=False)
    assert originals.trained == 0  # shared by every method
    assert torch.equal(a.models[0].net[0].weight, originals.models[0].net[0].weight)  # the no-op kept the original
    with pytest.raises(ValueError, match="method must be"):
        R.unlearned_population(TinyMLP(), dm, unlearn, "", {}, 2, 1, cache_dir=tmp_path, progress=False)
