"""Centralised baselines: one interface, the input model untouched, masks as documented, a benchmark smoke run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightning_unlearn.baselines import BASELINES, run_method
from lightning_unlearn.baselines.controls import output_row_mask, random_channel_mask
from lightning_unlearn.baselines.salun import saliency_mask
from lightning_unlearn.evidence.report import weights_sha256
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.metrics import split_accuracies

FORGETTERS = ("selective", "random_channels", "neggrad_plus", "random_label", "salun")


@pytest.fixture(scope="module")
def results(_trained, digits):
    from lightning_unlearn import ForgetRequest
    from lightning_unlearn.data import UnlearningDataModule

    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    before = weights_sha256(_trained)
    out = {name: run_method(name, _trained, dm, epochs=3 if name == "retrain" else 2, seed=0) for name in BASELINES}
    assert weights_sha256(_trained) == before, "a baseline modified its input model"
    return dm, out


def test_every_method_returns_a_result_with_metrics(results):
    _, out = results
    assert set(out) == set(BASELINES)
    for name, r in out.items():
        assert r.model(torch.zeros(2, 1, 8, 8)).shape == (2, 10), name
        assert 0 <= r.metrics["remaining_acc"] <= 1 and r.timings_s["total"] >= 0, name


@pytest.mark.parametrize("name", FORGETTERS)
def test_forgetting_methods_forget_class_3(results, name):
    _, out = results
    assert out[name].metrics["forget_acc"] < 0.5, out[name].metrics


def test_output_row_only_changes_the_forgotten_row(results, _trained):
    dm, out = results
    r = out["output_row"]
    assert r.metrics["forget_acc"] < split_accuracies(_trained, dm)["forget_acc"] - 0.1
    assert r.mask.channels == {"fc2": [3]}
    assert frozen_elements_equal(r.model, dict(_trained.named_parameters()), r.mask)
    assert not torch.equal(r.model.fc2.weight[3], _trained.fc2.weight[3])


def test_random_channels_match_ours_in_size_not_in_choice(results, _trained):
    dm, out = results
    ours, rnd = out["selective"].mask, out["random_channels"].mask
    assert {k: len(v) for k, v in ours.channels.items()} == {k: len(v) for k, v in rnd.channels.items()}
    assert ours.channels != rnd.channels and rnd.channels["fc2"] == [3]
    assert random_channel_mask(_trained, dm, 0.1, seed=0) == rnd  # seeded
    assert random_channel_mask(_trained, dm, 0.1, seed=1) != rnd


def test_salun_mask_is_half_of_the_elements_and_ssd_only_dampens_its_mask(results, _trained):
    dm, out = results
    mask = saliency_mask(_trained, dm.forget_dataloader(), ratio=0.5)
    assert mask.fraction == pytest.approx(0.5, abs=0.01)
    ssd = out["ssd"]
    assert 0 < ssd.mask.fraction < 0.5
    assert frozen_elements_equal(ssd.model, dict(_trained.named_parameters()), ssd.mask)
    for name, p in ssd.model.named_parameters():
        ref = dict(_trained.named_parameters())[name]
        sel = ssd.mask.masks[name]
        assert torch.all(p.detach()[sel].abs() <= ref.detach()[sel].abs() + 1e-7)  # dampened, never amplified


def test_output_row_mask_for_sample_requests_is_the_whole_head(_trained, digits):
    from lightning_unlearn import ForgetRequest
    from lightning_unlearn.data import UnlearningDataModule

    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(sample_ids=range(20)), batch_size=64)
    assert output_row_mask(_trained, dm).channels == {"fc2": list(range(10))}


def test_unknown_method_names_the_allowed_ones(results):
    dm, _ = results
    with pytest.raises(ValueError, match=r"unknown method 'fisher'; allowed methods are \['selective', 'retrain'"):
        run_method("fisher", None, dm)


def test_benchmark_harness_smoke(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "central.py"
    spec = importlib.util.spec_from_file_location("central_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    module.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--markdown", str(md)])
    data = json.loads((tmp_path / "central_digits_smoke.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"retrain", "ours", "(original)"}
    text = md.read_text()
    assert "## Other section\n\nkept" in text and "## Centralised methods (digits, MNIST)" in text
    assert "| ours |" in text and "[" in text  # MIA shown with its shadow accuracy
    module.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--markdown", str(md)])
    assert md.read_text().count("## Centralised methods") == 1  # regenerated in place
