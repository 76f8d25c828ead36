"""`lightning-unlearn` end to end as a user runs it: fit, unlearn, evaluate on digits; configs; user errors."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unlearn.config import field_names
from lightning_unlearn.cli import main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DIGITS = str(ROOT / "configs" / "digits_cnn.yaml")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lightning_unlearn.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_fit_unlearn_evaluate_on_digits(tmp_path):
    fit = _cli("fit", "--config", DIGITS, "--trainer.max_epochs", "3", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    original = tmp_path / "outputs" / "digits" / "original.ckpt"
    assert original.is_file()
    before = _sha(original)

    run = _cli("unlearn", "--config", DIGITS, "--ckpt_path", str(original), "--unlearning.epochs", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _sha(original) == before  # the input checkpoint is never touched
    unlearned = tmp_path / "outputs" / "digits" / "original-unlearned.ckpt"
    assert unlearned.is_file()
    (report_path,) = (tmp_path / "outputs" / "digits").glob("*.report.json")
    report = json.loads(report_path.read_text())
    for key in ("request", "method", "params", "seed", "versions", "original_sha256", "unlearned_sha256",
                "mask", "mask_file", "metrics", "timings_s"):
        assert key in report, key
    assert report["request"] == {"kind": "class", "classes": [3]}
    assert 0 < report["mask"]["fraction"] < 0.25
    assert report["metrics"]["unlearned"]["forget_acc"] <= 0.05
    assert report["metrics"]["original"]["forget_acc"] >= 0.8
    assert Path(report["mask_file"]).is_file()
    assert all(Path(p).stat().st_size > 1000 for p in report["plots"])
    assert "unlearned" in run.stdout and "forget acc" in run.stdout

    again = _cli("unlearn", "--config", DIGITS, "--ckpt_path", str(original), "--unlearning.epochs", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "outputs" / "digits" / "original-unlearned-1.ckpt").is_file()  # never overwrites

    ev = _cli("evaluate", "--config", DIGITS, "--ckpt_path", str(original), "--unlearned_path", str(unlearned),
              "--retrain_epochs", "3", "--relearn", "false", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluation = json.loads((tmp_path / "outputs" / "digits" / "evaluation.json").read_text())
    assert set(evaluation["metrics"]) >= {"original", "unlearned", "retrained", "comparison"}
    assert "avg_gap" in evaluation["metrics"]["comparison"]
    assert (tmp_path / "outputs" / "digits" / "evaluation.per_class.png").stat().st_size > 1000
    assert "retrained" in ev.stdout
    assert _sha(original) == before


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_passes_print_config(config, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--config", DIGITS, "--data.forget_classes", "[12]"], "unknown class(es) [12]"),
        (["fit", "--config", DIGITS, "--model.lrr", "0.1"], "Option 'lrr' is not accepted"),
        (["fit", "--config", DIGITS, "--trainer.max_epochz", "2"], "unrecognized arguments"),
        (["unlearn", "--config", DIGITS, "--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        (["fit", "--config", str(ROOT / "configs" / "mnist_cnn.yaml")], "MNIST needs a data root"),
        (["fit", "--config", DIGITS, "--trainer.accelerator", "gpu"], "gpu"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-unlearn: error:") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    "args, line",
    [
        (["--data.init_args.batch_size", "0"], "batch_size must be >= 1, got 0"),
        (["--model.init_args.optimizer", "sgdx"], "unknown optimizer 'sgdx'; allowed are ['adam', 'adamw', 'sgd']"),
        (["--data.forget_classes", "null"], "no forget request: set one of forget_classes, forget_sample_ids, "
         "forget_random_fraction; got forget_classes=None, forget_sample_ids=None, forget_random_fraction=None"),
        (["--data.forget_classes", "[]"], "no forget request: set one of forget_classes, forget_sample_ids, "
         "forget_random_fraction; got forget_classes=[], forget_sample_ids=None, forget_random_fraction=None"),
        (["--data.forget_random_fraction", "0.1"], "give only one of forget_classes, forget_sample_ids, "
         "forget_random_fraction; got forget_classes=[3], forget_random_fraction=0.1"),
    ],
)
def test_errors_raised_by_a_class_are_one_line_without_the_config_dump(args, line, capsys, tmp_path, monkeypatch):
    """A data module's or model's own error is the whole line: no ``Namespace(...)`` of the section appended."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", DIGITS, *args])
    assert done.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Seed set")]
    assert err == [f"lightning-unlearn: error: {line}"]


def test_help_documents_the_unlearn_options(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    out = capsys.readouterr().out
    for option in ("--ckpt_path", "--output_dir", *(f"--unlearning.{name}" for name in field_names())):
        entries = [ln for ln in out.splitlines() if ln.startswith("  --") and ln.split()[0] == option]
        assert len(entries) == 1, option  # every setting documented once, from the one UnlearnConfig
    assert "fraction of channels to update" in out


@pytest.mark.slow
def test_federated_config_switches_fit_unlearn_evaluate(tmp_path):
    config = str(ROOT / "configs" / "digits_fed.yaml")
    small = ["--federated.rounds", "2", "--unlearning.max_steps", "3", "--data.forget_classes", "[3]",
             "--data.forget_clients", "null"]
    fit = _cli("fit", "--config", config, *small, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-2000:]
    original = tmp_path / "outputs" / "digits_fed" / "original.ckpt"
    assert original.is_file() and "FedAvg: 2 rounds" in fit.stdout
    before = _sha(original)
    run = _cli("unlearn", "--config", config, *small, "--ckpt_path", str(original), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    (report_path,) = (tmp_path / "outputs" / "digits_fed").glob("*.report.json")
    report = json.loads(report_path.read_text())
    assert report["request"] == {"kind": "class", "classes": [3]}
    assert report["bytes_moved"]["unlearning_round"] < report["bytes_moved"]["fedavg_round"]
    assert report["metrics"]["unlearned"]["forget_acc"] < report["metrics"]["original"]["forget_acc"]
    assert _sha(original) == before
    ev = _cli("evaluate", "--config", config, *small, "--ckpt_path", str(original), "--relearn", "false",
              "--unlearned_path", str(tmp_path / "outputs" / "digits_fed" / "original-unlearned.ckpt"), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    evaluation = json.loads((tmp_path / "outputs" / "digits_fed" / "evaluation.json").read_text())
    assert evaluation["metrics"]["retrained"]["forget_acc"] == pytest.approx(0.0, abs=0.02)


def test_evaluate_attack_ulira_writes_the_attack_into_evaluation_json(tmp_path, monkeypatch, capsys):
    """The CLI contract: `evaluate ... --attack ulira --references N` writes AUC / TPR per model under "ulira"."""
    import torch

    from lightning_unlearn.models import SmallCNN

    monkeypatch.chdir(tmp_path)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.ckpt")
        torch.save({"state_dict": SmallCNN().state_dict()}, paths[-1])
    main(["evaluate", "--config", str(ROOT / "configs" / "digits_cnn.yaml"), "--trainer.logger", "false",
          "--ckpt_path", str(paths[0]), "--unlearned_path", str(paths[1]), "--retrained_path", str(paths[0]),
          "--relearn", "false", "--attack", "ulira", "--references", "2", "--reference_epochs", "1",
          "--reference_cache", str(tmp_path / "refs"), "--output_dir", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["ulira"]
    assert result["references"] == 2 and set(result["per_model"]) == {"original", "unlearned", "retrained"}
    for row in result["per_model"].values():
        assert 0 <= row["auc"] <= 1 and {"tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"} <= set(row)
    out = capsys.readouterr().out
    assert "ulira: forget samples vs held-out samples" in out and "attack UNINFORMATIVE" in out  # random models


def test_demo_table_shows_relearn_steps(capsys):
    import torch

    from lightning_unlearn.demo import print_table
    from lightning_unlearn.result import UnlearningResult

    metrics = {"forget_acc": 0.0, "remaining_acc": 0.99, "test_acc": 0.89}
    results = {"original": UnlearningResult(torch.nn.Linear(1, 1), None, dict(metrics), {"total": 1.0}),
               "unlearned": UnlearningResult(torch.nn.Linear(1, 1), None, dict(metrics), {"total": 0.1},
                                             extra={"relearn_steps": 10}),
               "retrained": UnlearningResult(torch.nn.Linear(1, 1), None, dict(metrics), {"total": 2.0},
                                             extra={"relearn_steps": None})}
    print_table(results, "demo")
    out = capsys.readouterr().out
    assert "relearn steps" in out and "> 200" in out and "hid what it knew" in out
