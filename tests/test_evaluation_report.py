"""UnlearningReport round trip, hashes against the saved weights, no overwrite, plots and compare()."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from lightning_unlearn import unlearn
from lightning_unlearn.evidence import UnlearningReport, compare, write_report
from lightning_unlearn.evidence.plots import plot_channel_scores, plot_mia_histograms, plot_per_class_accuracy
from lightning_unlearn.evidence.report import save_weights, weights_sha256
from lightning_unlearn.mask import ParameterMask

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, _trained, digits):
    """One unlearning run on digits class 3 and its written report (built once for this module)."""
    from lightning_unlearn import ForgetRequest
    from lightning_unlearn.data import UnlearningDataModule

    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    original = _trained
    before = weights_sha256(original)
    result = unlearn(original, dm, ratio=0.1, epochs=1)
    out = tmp_path_factory.mktemp("run")
    report, path = write_report(
        out, original, result, dm, "ours", {"ratio": 0.1}, seed=0, retrained=None,
        bytes_moved={"up": 123, "down": 456}, relearn=False, max_samples=300,
    )
    return dict(dm=dm, original=original, result=result, report=report, path=path, out=out, before=before)


def test_report_round_trips_and_hashes_match_saved_weights(run):
    report, path = run["report"], run["path"]
    assert path.name == "ours.report.json" and path.parent == run["out"]
    loaded = UnlearningReport.load(path)
    assert loaded == report
    assert json.loads(path.read_text())["request"] == {"kind": "class", "classes": [3]}
    assert report.unlearned_sha256 == weights_sha256(report.checkpoint) == weights_sha256(run["result"].model)
    assert report.original_sha256 == weights_sha256(run["original"]) == run["before"]  # input untouched
    assert report.original_sha256 != report.unlearned_sha256
    state = torch.load(report.checkpoint, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in run["result"].model.state_dict().items())
    assert ParameterMask.load(report.mask_file) == run["result"].mask
    assert report.mask["fraction"] == pytest.approx(run["result"].mask.fraction)
    assert report.bytes_moved == {"up": 123, "down": 456}
    assert report.versions["torch"] == torch.__version__.split("+")[0] or report.versions["torch"] == torch.__version__
    unlearned = report.metrics["unlearned"]
    assert unlearned["forget_acc"] < report.metrics["original"]["forget_acc"]
    assert {"mia_efficacy", "mia_shadow_acc", "loss_auc", "probe_forget_acc"} <= set(unlearned)


def test_plots_written_and_non_empty(run):
    plots = run["report"].plots
    assert len(plots) == 3  # per-class accuracy, channel scores, MIA histograms
    for p in plots:
        data = open(p, "rb").read()
        assert data[:8] == PNG and len(data) > 5000


def test_existing_report_is_never_overwritten(run, tmp_path):
    report = run["report"]
    first = report.save(tmp_path / "r.report.json")
    original_text = first.read_text()
    second = report.save(first)
    assert second.name == "r-1.report.json" and first.read_text() == original_text
    with pytest.raises(FileExistsError, match=r"r\.report\.json already exists; refusing to overwrite"):
        report.save(first, on_exists="error")
    with pytest.raises(ValueError, match=r"unknown on_exists 'replace'; allowed values are \['suffix', 'error'\]"):
        report.save(first, on_exists="replace")
    weights = save_weights(run["result"].model, tmp_path / "m.pt")
    assert save_weights(run["result"].model, weights).name == "m-1.pt"


def test_second_run_in_same_folder_gets_suffixed_files(run):
    result, dm = run["result"], run["dm"]
    report2, path2 = write_report(
        run["out"], run["original"], result, dm, "ours", {}, seed=0, evaluation={
            "original": run["report"].metrics["original"], "unlearned": run["report"].metrics["unlearned"],
        }, plots=False,
    )
    assert path2.name == "ours-1.report.json" and report2.checkpoint.endswith("ours-1.pt")
    assert UnlearningReport.load(run["path"]) == run["report"]  # the first report is unchanged


def test_plot_functions_directly(tmp_path, run):
    scores = run["result"].scores
    p1 = plot_channel_scores(scores, tmp_path / "s.png", run["result"].mask)
    p2 = plot_per_class_accuracy({"a": [1.0, 0.5, None], "b": [0.9, 0.0, 1.0]}, tmp_path / "c.png", [1])
    rng = np.random.default_rng(0)
    p3 = plot_mia_histograms({"m": {"members": rng.random(50), "forget": rng.random(20)}}, tmp_path / "h.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 3000
    with pytest.raises(ValueError, match="at least one"):
        plot_per_class_accuracy({}, tmp_path / "x.png")


def test_compare_prints_mean_std_and_flags_uninformative_mia(run):
    rows = [
        {"method": "ours", "forget_acc": 0.0, "remaining_acc": 0.98, "mia_efficacy": 1.0, "mia_shadow_acc": 0.51},
        {"method": "ours", "forget_acc": 0.02, "remaining_acc": 0.96, "mia_efficacy": 0.9, "mia_shadow_acc": 0.53},
        {"method": "finetune", "forget_acc": 0.8, "remaining_acc": 0.99, "mia_efficacy": 0.3, "mia_shadow_acc": 0.7},
    ]
    console = Console(record=True, width=200)
    compare(rows, console=console)
    compare([run["report"]], console=console)
    text = console.export_text()
    assert "1.0 ± 1.4" in text and "97.0 ± 1.4" in text  # mean ± std in percent
    assert "95.0 ± 7.1 [52%!]" in text and "30.0 [70%]" in text  # shadow accuracy beside MIA, ! below 55%
    assert "finetune" in text
    with pytest.raises(ValueError, match="at least one run"):
        compare([], console=console)
