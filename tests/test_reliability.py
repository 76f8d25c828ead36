"""Issue 12: no code execution from files, no silent reuse or drops, kill-safe outputs, DDP from the CLI, one-line errors.

Items 5 (message contracts) and 10 (MNIST file errors) are tested next to their code:
``tests/test_messages_contract.py`` and ``tests/test_datasets.py``.
"""
from __future__ import annotations

import copy
import os
import pathlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch.utils.data import Dataset, TensorDataset

from lightning_unlearn import ForgetRequest, ParameterMask, UnlearnConfig, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import is_incomplete
from lightning_unlearn.baselines.ssd import ssd
from lightning_unlearn.callbacks import GradientMask, SelectiveUnlearning
from lightning_unlearn.cli import main
from lightning_unlearn.commands import load_weights
from lightning_unlearn.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_cnn.yaml")
DIGITS_FED = str(ROOT / "configs" / "digits_fed.yaml")
QUIET = ["--trainer.logger", "false"]


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: proof that a loader executed code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _plant(path: Path, marker: Path, state: dict | None = None) -> Path:
    torch.save({**(state or {"state_dict": SmallCNN().state_dict()}), "payload": Payload(marker)}, path)
    return path


def _one_line_exit_2(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Seed set")]
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """LightningCLI writes config.yaml into the working directory when no logger is set: keep it in tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "original.ckpt"
    torch.save({"state_dict": SmallCNN().state_dict()}, path)
    return path


# -- 1. no code execution from files ------------------------------------------------------------------
def test_planted_pickles_are_refused_everywhere_and_never_run(tmp_path, checkpoint, capsys):
    marker = tmp_path / "payload-ran"
    evil = _plant(tmp_path / "evil.ckpt", marker)
    # the CLI: unlearn --ckpt_path, evaluate --unlearned_path / --retrained_path
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(evil), *QUIET], capsys)
    assert "holds objects other than tensors" in line and "evil.ckpt" in line
    for flag in ("--unlearned_path", "--retrained_path"):
        other = ["--unlearned_path", str(checkpoint)] if flag == "--retrained_path" else []
        line = _one_line_exit_2(["evaluate", "--config", DIGITS, "--ckpt_path", str(checkpoint), flag, str(evil),
                                 *other, "--relearn", "false", *QUIET], capsys)
        assert "evil.ckpt" in line
    # the Python API: a mask file, GradientMask(mask=path), checkpoint loading
    mask_file = _plant(tmp_path / "evil.mask.pt", marker, ParameterMask.full(SmallCNN()).to_checkpoint())
    for load in (lambda: ParameterMask.load(mask_file), lambda: GradientMask(mask=mask_file),
                 lambda: load_weights(SmallCNN(), evil)):
        with pytest.raises(ValueError, match="holds objects other than tensors"):
            load()
    # the server's resume file (FedAvg and unlearning rounds) and a Flower node's data file
    from lightning_unlearn.federated.checkpoint import STATE_FILE, ServerCheckpoint

    rounds = tmp_path / "rounds"
    rounds.mkdir()
    _plant(rounds / STATE_FILE, marker, {"key": {}, "trained": {}, "training": []})
    with pytest.raises(ValueError, match="server checkpoint .* holds objects other than tensors"):
        ServerCheckpoint.open(rounds, {})
    from flwr.app import Context

    from lightning_unlearn.federated.partitions import file_partition

    node_file = _plant(tmp_path / "client0.pt", marker, {"x": torch.zeros(2, 1, 8, 8)})
    context = Context(run_id=1, node_id=1, node_config={"data-path": str(node_file)}, state=None, run_config={})
    with pytest.raises(ValueError, match="holds objects other than tensors"):
        file_partition(context)
    # a SISA ensemble file, and the weights a ledger verifies (weights_sha256 of the file on disk)
    from lightning_unlearn.evidence.report import weights_sha256
    from lightning_unlearn.exact.ensemble import SISAEnsemble

    for load in (lambda: SISAEnsemble.load(evil), lambda: weights_sha256(evil)):
        with pytest.raises(ValueError, match="holds objects other than tensors"):
            load()
    assert not marker.exists()  # the payload never ran


# -- 2. a resume file is reused only by the run that wrote it -------------------------------------------------
def test_fedavg_resume_refuses_another_runs_file(tmp_path, digits, one_thread):
    from lightning_unlearn.data import FederatedDataModule
    from lightning_unlearn.federated import FederatedSimulation

    def federation(alpha: float) -> FederatedSimulation:
        fdm = FederatedDataModule(digits[0], digits[1], num_clients=3, partition="dirichlet", alpha=alpha, seed=0)
        torch.manual_seed(0)
        return FederatedSimulation(fdm, SmallCNN(), rounds=1, checkpoint_dir=tmp_path, progress=False,
                                   trainer_kwargs={"max_steps": 2})

    first = federation(0.5)
    first.train(resume=True)
    again = federation(0.5)
    again.train(resume=True)  # the same run: nothing left to train, same weights
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    other = federation(5.0)
    with pytest.raises(ValueError, match=r"server_state.pt was written by a different run \(partition changed\); start "
                                         r"fresh \(resume=False, --federated.fresh true\)"):
        other.train(resume=True)
    other.train(resume=False)  # --federated.fresh true


# -- 3. CLI unlearn and evaluate under DDP ----------------------------------------------------------------
@pytest.mark.slow
def test_cli_unlearn_and_evaluate_under_ddp_on_two_cpu_processes(tmp_path, checkpoint):
    cli = [str(Path(sys.executable).with_name("lightning-unlearn"))]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    unlearn = subprocess.run([*cli, "unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *ddp,
                              "--unlearning.max_steps", "3", "--output_dir", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert unlearn.returncode == 0, unlearn.stderr[-3000:]
    target = tmp_path / "out" / "original-unlearned.ckpt"
    assert target.is_file() and not is_incomplete(target)
    assert len(list((tmp_path / "out").glob("*.report.json"))) == 1
    evaluate = subprocess.run([*cli, "evaluate", "--config", DIGITS, "--ckpt_path", str(checkpoint), *ddp,
                               "--unlearned_path", str(target), "--retrained_path", str(checkpoint),
                               "--relearn", "false"], capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert (tmp_path / "out" / "evaluation.json").is_file()


# -- 4, 9. bad values: one line naming the value, exit code 2, before any work -----------------------------------
@pytest.mark.parametrize("args, expected", [
    (["--unlearning.epochs", "-1"], "epochs must be an integer >= 1 or None, got -1"),
    (["--unlearning.epochs", "0"], "epochs must be an integer >= 1 or None, got 0"),
    (["--unlearning.epochs", "two"], "unlearning.epochs: expected NoneType or int, got 'two'"),
    (["--unlearning.ratio", "nan"], "unlearning.ratio: expected float, got 'nan'"),
    (["--data.forget_classes", "three"], "data.forget_classes: expected NoneType or list, got 'three'"),
    (["--data.forget_classes", "null", "--data.forget_sample_ids", "[1.5]"], "data.forget_sample_ids"),
])
def test_bad_values_end_in_one_line(args, expected, checkpoint, capsys):
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *QUIET, *args], capsys)
    assert expected in line


# -- 6. the federated engine honours epochs, scope, max_samples and contrast -----------------------------------
def test_federated_unlearn_honours_every_selection_and_budget_option(digits, one_thread):
    from lightning_unlearn.data.presets import FederatedDigitsData
    from lightning_unlearn.commands import FederatedEngine
    from lightning_unlearn.federated.runner import FederatedSettings

    fdm = FederatedDigitsData(num_clients=3, forget_classes=[3], batch_size=64)
    torch.manual_seed(0)
    model = SmallCNN()
    settings = FederatedSettings(rounds=1, unlearn_rounds=1)
    base = UnlearnConfig(ratio=0.2, max_samples=200, epochs=1)

    def run(config):
        result = FederatedEngine(settings, seed=0).unlearn(copy.deepcopy(model), fdm, config)
        return result.mask.sha256(), [p.detach().clone() for p in result.model.parameters()], result.scores

    mask0, weights0, scores0 = run(base)
    for change in ({"scope": "global"}, {"max_samples": 5}, {"contrast": True}):
        mask, _, scores = run(UnlearnConfig.build(base, **change))
        assert mask != mask0 or any(not torch.equal(scores[n], scores0[n]) for n in scores0), change
        if "max_samples" in change:
            assert scores.num_samples < scores0.num_samples
    mask, weights, _ = run(UnlearnConfig.build(base, epochs=2))
    assert mask == mask0 and any(not torch.equal(a, b) for a, b in zip(weights, weights0))


# -- 7. corrupt checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "truncated"])
def test_corrupt_checkpoints_end_in_one_line(content, tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(checkpoint.read_bytes()[:200] if content == "truncated" else content)
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(bad), *QUIET], capsys)
    assert "bad.ckpt is not a readable torch file" in line


# -- 8. the output directory is checked before the work ------------------------------------------------------------
def test_output_directory_is_checked_before_any_work(tmp_path, checkpoint, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *QUIET,
                             "--output_dir", str(a_file / "out")], capsys)
    assert line.endswith(f"output directory {a_file / 'out'} lies under a file, not a directory")
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *QUIET,
                             "--output_dir", str(a_file)], capsys)
    assert "is not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; run as a user to check this")
def test_unwritable_output_directory_is_refused(tmp_path, checkpoint, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = _one_line_exit_2(["unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *QUIET,
                             "--output_dir", str(locked)], capsys)
    assert "is not writable" in line


# -- 11. the Python API refuses or names what it changes -----------------------------------------------------------
def test_python_api_names_what_it_would_otherwise_do_quietly(tmp_path, trained_model):
    with pytest.warns(UserWarning, match=r"sample_ids \[4\] given more than once"):
        assert ForgetRequest(sample_ids=[4, 4, 5]).sample_ids == (4, 5)
    mask = ParameterMask.full(trained_model)
    path = mask.save(tmp_path / "mask.pt")
    assert GradientMask(mask=pathlib.Path(path)).mask == mask  # a pathlib.Path works like a str
    with pytest.raises(ValueError, match="mask must be a ParameterMask or a path"):
        GradientMask(mask=42)
    saved = SelectiveUnlearning(ratio=0.1)
    saved.mask = mask
    resumed = SelectiveUnlearning(ratio=0.5)
    with pytest.warns(UserWarning, match=r"resumes with the checkpoint's mask .* ratio setting does not apply"):
        resumed.load_state_dict(saved.state_dict())
    assert resumed.mask == mask


# -- 12. a killed run leaves nothing that looks finished; a rerun cleans up ------------------------------------
def test_interrupted_unlearning_is_marked_and_cleaned_by_the_rerun(monkeypatch, tmp_path, checkpoint, capsys):
    import lightning_unlearn.evidence.evaluate as evaluate

    out = tmp_path / "out"
    args = ["unlearn", "--config", DIGITS, "--ckpt_path", str(checkpoint), *QUIET, "--output_dir", str(out),
            "--unlearning.max_steps", "2"]

    def killed(*_, **__):
        raise KeyboardInterrupt("killed while writing the plots")

    real_plot = evaluate.plot_mia_histograms
    monkeypatch.setattr(evaluate, "plot_mia_histograms", killed)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    target = out / "original-unlearned.ckpt"
    assert target.is_file() and is_incomplete(target)  # on disk, but marked as unfinished
    with pytest.raises(ValueError, match="belongs to an unlearning run that did not finish"):
        load_weights(SmallCNN(), target)
    assert not list(out.glob("*.report.json"))
    monkeypatch.setattr(evaluate, "plot_mia_histograms", real_plot)  # (undo() would also undo the chdir)
    main(args)  # the rerun removes the leftovers, then writes a complete set under the same names
    assert target.is_file() and not is_incomplete(target) and not list(out.glob(".*.incomplete"))
    assert not (out / "original-unlearned-1.ckpt").exists()
    files = [p for p in out.iterdir() if p.is_file()]
    assert {p.suffix for p in files} >= {".ckpt", ".pt", ".json", ".png"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}  # one file mode for the whole set
    load_weights(SmallCNN(), target)


# -- 13. `test` works on the shipped models; the evaluate table has no empty columns -------------------------------
def test_test_subcommand_and_evaluate_table(tmp_path, capsys):
    from lightning_unlearn.federated.runner import save_checkpoint

    lightning_ckpt = save_checkpoint(SmallCNN(), tmp_path / "model.ckpt")  # what `fit` writes for a federation
    main(["test", "--config", DIGITS, "--ckpt_path", str(lightning_ckpt), *QUIET])
    assert "test_acc" in capsys.readouterr().out
    from lightning_unlearn.evidence import compare

    console = Console(width=200, record=True)
    compare([{"method": "unlearned", "forget_acc": 0.0, "remaining_acc": 0.9}], console=console)
    text = console.export_text()
    assert "time (s)" not in text and "MIA-eff" not in text and " s " not in text
    compare([{"method": "u", "forget_acc": 0.0, "relearn_steps": 12, "tow": 0.98}], console=console)
    text = console.export_text()
    assert "relearn steps" in text and "0.980" in text


# -- 14. data that would poison the repair is refused before any work; items may carry extra fields (issue 21) ----
def test_a_nan_pixel_is_refused_before_unlearning_starts(digits, trained_model, one_thread):
    x, y = (t.clone() for t in digits[0].tensors)
    x[100, 0, 4, 4] = float("nan")
    before = copy.deepcopy(trained_model.state_dict())
    with pytest.raises(ValueError, match=r"^training dataset: the input of sample 100 is not finite \(nan at \[0, 4, 4\]\)"):
        dm = UnlearningDataModule(TensorDataset(x, y), digits[1], ForgetRequest(classes=[3]))
        unlearn(trained_model, dm, max_steps=3, inplace=True)  # (before the check: every weight NaN, "step budget")
    assert all(torch.equal(before[k], v) for k, v in trained_model.state_dict().items())


def test_items_with_an_index_field_unlearn_like_pairs(digits, trained_model, one_thread):
    class WithIndex(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return (*self.base[i], i)

    dm = UnlearningDataModule(WithIndex(digits[0]), WithIndex(digits[1]), ForgetRequest(classes=[3]), num_classes=10)
    for objective in ("random_label", "retain"):  # forget-aware (combined batches) and retain-only repair
        result = unlearn(trained_model, dm, max_steps=3, objective=objective)
        assert result.extra["steps"] == 3
        assert all(torch.isfinite(p).all() for p in result.model.parameters())
        assert result.metrics["forget_acc"] is not None
    pairs = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), num_classes=10)
    assert ssd(trained_model, dm, max_samples=64).mask == ssd(trained_model, pairs, max_samples=64).mask
