"""The population harness (benchmarks/population.py): U-LiRA scores two samples of one population at
chance, separated populations near 1, the class calibration removes a per-model global shift, plug-ins load,
and masked candidate updates keep every parameter element outside the mask bit-for-bit."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import population  # noqa: E402
import population_methods as pm  # noqa: E402

from lightning_unlearn import ForgetRequest  # noqa: E402
from lightning_unlearn.data import UnlearningDataModule  # noqa: E402
from lightning_unlearn.data import load_digits_datasets  # noqa: E402
from lightning_unlearn.evidence.attacks import population_statistics  # noqa: E402


def _population(rng, k: int, n: int, mu: np.ndarray, model_sd: float = 1.0) -> np.ndarray:
    return mu[None] + model_sd * rng.standard_normal((k, n))


def test_two_samples_of_one_gaussian_population_score_chance():
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 3, 300)  # per-example means differ, as real phi does
    aucs = [population.ulira_auc(_population(rng, 8, 300, mu), _population(rng, 8, 300, mu)) for _ in range(5)]
    assert abs(np.mean(aucs) - 0.5) < 0.03
    assert abs(population.halves_auc(_population(rng, 16, 300, mu)) - 0.5) < 0.05


def test_separated_populations_score_near_one():
    rng = np.random.default_rng(1)
    mu = rng.normal(0, 3, 300)
    assert population.ulira_auc(_population(rng, 8, 300, mu + 4.0), _population(rng, 8, 300, mu)) > 0.97


def test_class_calibration_removes_a_per_model_global_shift():
    rng = np.random.default_rng(2)
    n_f, n_h = 200, 400
    f_labels, h_labels = rng.integers(0, 3, n_f), rng.integers(0, 3, n_h)
    mu_f, mu_h = rng.normal(0, 2, n_f), rng.normal(0, 2, n_h)

    def pop(shift: float):
        offset = shift + 0.1 * rng.standard_normal((8, 1))  # each model: one global offset on every sample
        return (_population(rng, 8, n_f, mu_f, 0.5) + offset, _population(rng, 8, n_h, mu_h, 0.5) + offset)

    (uf, uh), (rf, rh) = pop(3.0), pop(0.0)
    assert population.ulira_auc(uf, rf) > 0.95  # raw: the shift gives every model away
    cal_u, cal_r = (population.calibrate(f, f_labels, h, h_labels) for f, h in ((uf, uh), (rf, rh)))
    assert abs(population.ulira_auc(cal_u, cal_r) - 0.5) < 0.06


def test_calibration_fails_without_heldout_samples_of_a_class():
    with pytest.raises(ValueError, match="class 2"):
        population.calibrate(np.zeros((2, 3)), np.array([0, 1, 2]), np.zeros((2, 2)), np.array([0, 1]))


def test_two_halves_of_one_real_population_score_about_chance():
    train, _ = load_digits_datasets()
    data = Subset(train, list(range(400)))
    models = [population.train_plain(population.ARCHS["MLP"](image_size=8), data, 3, 64, seed=s) for s in range(8)]
    phi = population_statistics(models, Subset(train, list(range(400, 600))))  # nobody trained on these
    assert abs(population.halves_auc(phi, splits=20) - 0.5) < 0.1


def test_plugin_entries_become_methods(tmp_path):
    good = tmp_path / "peers.py"
    good.write_text("PEERS = {'noop': lambda task: task.original}\n")
    assert list(population.load_plugin(good)) == ["noop"]
    bad = tmp_path / "bad.py"
    bad.write_text("PEERS = ['noop']\n")
    with pytest.raises(ValueError, match="PEERS"):
        population.load_plugin(bad)
    with pytest.raises(SystemExit) as exit_:
        population.main(["--plugin", str(tmp_path / "missing.py"), "--render"])
    assert exit_.value.code == 2


def test_masked_distillation_keeps_everything_outside_the_mask_bit_for_bit():
    train, test = load_digits_datasets()
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=32, num_classes=10)
    model = population.ARCHS["SmallCNN"]()
    before = copy.deepcopy(model.state_dict())
    masks = {"fc2.weight": torch.zeros_like(model.fc2.weight, dtype=torch.bool)}
    masks["fc2.weight"][3] = True
    task = population.Task(original=model, datamodule=dm, recipe={}, num_classes=10, seed=0)
    out = pm.distill(task, steps=5, masks=masks)
    after = out.state_dict()
    assert not torch.equal(after["fc2.weight"][3], before["fc2.weight"][3])
    assert torch.equal(after["fc2.weight"][:3], before["fc2.weight"][:3])
    for name, value in before.items():  # every other parameter and every BatchNorm buffer
        if name != "fc2.weight":
            assert torch.equal(after[name], value), name


def test_head_fit_changes_only_the_forgotten_rows_and_pushes_their_logit_down():
    train, test = load_digits_datasets()
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=64, num_classes=10)
    model = population.train_plain(population.ARCHS["MLP"](image_size=8), train, 3, 64, seed=0)
    before = copy.deepcopy(model.state_dict())
    recipe = {"optimizer": "SGD", "lr": 0.05, "weight_decay": 0.0, "batch_size": 64, "epochs": 3}
    out = pm.head_fit(population.Task(original=model, datamodule=dm, recipe=recipe, num_classes=10, seed=0))
    after = out.state_dict()
    for name, value in before.items():
        if name.startswith("head."):
            keep = torch.ones(len(value), dtype=torch.bool)
            keep[3] = False
            assert torch.equal(after[name][keep], value[keep]), name
            assert not torch.equal(after[name][3], value[3]), name
        else:
            assert torch.equal(after[name], value), name
    x = torch.stack([dm.forget_set[i][0] for i in range(len(dm.forget_set))])
    with torch.no_grad():
        assert (out(x).argmax(1) != 3).all()  # the forgotten class is never predicted for its own samples


def test_curve_counts_the_default_share_as_the_mask_unlearn_builds():
    """The docs' evidence-against-share curve counts each method's share on a fresh model; the default's must be
    the fraction of the mask ``unlearn()`` really uses (here two repair steps on an untrained SmallCNN-GN)."""
    import population_curve

    from lightning_unlearn import UnlearnConfig, unlearn

    train, test = load_digits_datasets()
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[population_curve.FORGOTTEN]), batch_size=64,
                              num_classes=10)
    torch.manual_seed(0)
    result = unlearn(population.ARCHS["SmallCNN-GN"](), dm, UnlearnConfig(max_steps=2), inplace=True)
    shares = population_curve.shares("SmallCNN-GN", "digits")
    assert shares["default"] == pytest.approx(result.mask.fraction, abs=1e-12)
    head = pm.head_layer(population.ARCHS["SmallCNN-GN"]())
    total = sum(p.numel() for p in population.ARCHS["SmallCNN-GN"]().parameters())
    assert shares["headfit"] == (head.in_features + 1) / total
    assert shares["headfit"] < shares["gradmask_10_headfit_b6"] < shares["gradmask_30_headfit_b6"] < 1.0
    assert shares["distill_headfit_b6"] == 1.0


def test_cost_estimate_scales_one_timed_batch_to_the_cell_and_the_page_lists_cells_without_results(tmp_path):
    """population_cost times a batch of the plain loop, scales it to K x (1 + 3.5 x requests) trainings of the
    schedule, and the page's "Cells not run" section shows that estimate for a pair without results."""
    import json
    import types

    import population_cost

    args = types.SimpleNamespace(batches=1, k=8)
    res = population_cost.measure("digits", "MLP", args)
    spec = population.DATASETS["digits"]
    assert res["samples_timed"] == spec.batch_size and res["num_train"] > spec.batch_size
    assert res["epoch_cpu_s"] == pytest.approx(res["timed_cpu_s"] * res["num_train"] / spec.batch_size)
    assert res["cell_trainings"] == 8 * (1 + 3.5 * len(population.REQUESTS))
    assert res["cell_cpu_s"] == pytest.approx(res["epoch_cpu_s"] * spec.epochs * res["cell_trainings"])
    res.update(command="cmd", machine="here")
    population_cost.cost_path("digits", "MLP", tmp_path).write_text(json.dumps(res))
    present = {(d, a) for d in population.DATASETS for a in population.ARCHS} - {("digits", "MLP"), ("mnist", "MLP")}
    lines = population_cost.section(tmp_path, present)
    rows = [line for line in lines if line.startswith("| digits") or line.startswith("| mnist")]
    assert [r.split(" | ")[0] for r in rows] == ["| digits / MLP", "| mnist / MLP"]
    assert "`cmd` on here" in rows[0] and rows[1].endswith("not measured |")
    assert population_cost.section(tmp_path, present | {("digits", "MLP"), ("mnist", "MLP")}) == []


def test_peer_section_names_a_peer_with_a_lower_auc_and_a_lower_cost_than_the_default(tmp_path):
    """The page's peer check: a peer is named on the views (raw, cal) where its AUC is lower while its speed-up over
    retraining is higher; a slower peer with lower AUCs is not."""
    import json

    def method(name, raw, cal, speedup):
        return {"method": name, "kind": "method", "forget_acc": 0.0, "ulira_raw": raw, "ulira_cal": cal,
                "speedup": speedup}

    cell = {"dataset": "digits", "architecture": "MLP", "request": "class3",
            "rows": [{"method": "original", "kind": "reference"}, method("default", 0.8, 0.7, 10.0)]}
    peers = {"rows": [{"method": "original", "kind": "reference"}, method("fast_low", 0.6, 0.75, 20.0),
                      method("slow_low", 0.5, 0.5, 5.0), method("fast_both", 0.7, 0.6, 11.0)]}
    population.peers_file(tmp_path, cell).write_text(json.dumps(peers))
    rows = {line.split(" | ")[1]: line.split(" | ")[-1].rstrip(" |") for line in population.peer_section(tmp_path, [cell])
            if line.startswith("| digits")}
    assert rows == {"fast_low": "raw", "slow_low": "no", "fast_both": "raw and cal"}
    assert population.peer_section(tmp_path, [{**cell, "request": "samples100"}]) == []


def test_runs_record_the_library_they_used_and_the_page_names_its_commit():
    """Each cell records the library's commit, its uncommitted files and the hash of the sources the default's cache
    key follows, so rows measured at different library states can be told apart; the page names the commit."""
    import hashlib

    state = population.library_state()
    assert state["sources_sha256"] == hashlib.sha256(pm._library_sources().encode()).hexdigest()
    assert state["git_commit"] is None or len(state["git_commit"]) == 40
    assert isinstance(state["uncommitted"], list)
    res = {"library": {"git_commit": "0123456789abcdef" * 2 + "01234567", "uncommitted": [" M lightning_unlearn/x.py"]}}
    assert population.library_note(res) == ", library at commit 0123456 with uncommitted edits to 1 library file(s)"
    assert population.library_note({**res, "library": {**res["library"], "uncommitted": []}}) == ", library at commit 0123456"
    assert population.library_note({}) == ""
