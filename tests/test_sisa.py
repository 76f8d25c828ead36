"""Exact unlearning with SISA: the bit-exactness guarantee, untouched shards, stale checkpoints, the ensemble, the CLI."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn import ForgetRequest
from lightning_unlearn._training import quiet_lightning
from lightning_unlearn.exact import SISA, SISAConfig
from lightning_unlearn.exact.ensemble import SISAEnsemble
from lightning_unlearn.exact.cli import main as sisa_main
from lightning_unlearn.exact.plan import file_sha256
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.models import SmallCNN

CONFIG = SISAConfig(shards=3, slices=3, epochs_per_slice=1, batch_size=64, seed=0)
TINY = dict(channels=(4, 8), hidden=16, lr=0.01)


def tiny_cnn() -> SmallCNN:
    return SmallCNN(**TINY)


@pytest.fixture(scope="module")
def deterministic(one_thread):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def train_set(digits):
    """A private copy of the digits training tensors (tests below edit it)."""
    x, y = digits[0].tensors
    return TensorDataset(x.clone(), y.clone())


@pytest.fixture
def fitted(tmp_path, train_set, deterministic):
    run = SISA(tmp_path / "run", tiny_cnn, train_set, CONFIG)
    run.fit()
    return run


def files_of(run: SISA) -> dict[str, str]:
    """SHA-256 of every file under the run's shard folders."""
    return {str(p.relative_to(run.root)): file_sha256(p) for p in sorted(run.root.glob("shard_*/*"))}


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deletion_is_bit_identical_to_training_from_scratch(fitted, train_set, tmp_path):
    shard = 1
    sample = int(fitted.slices[shard][1][5])  # in slice 1: slice 0's checkpoint is reused, slices 1-2 retrained
    kept = fitted.shard_state(shard)["stages"][0]
    result = fitted.forget(ForgetRequest(sample_ids=[sample]))
    assert result.affected[shard]["first_slice"] == 1 and set(result.affected) == {shard}
    assert fitted.shard_state(shard)["stages"][0] == kept  # resumed from the unaffected checkpoint

    reference = SISA(tmp_path / "scratch", tiny_cnn, train_set, CONFIG)
    reference.fit(shards=[shard], exclude=[sample])  # from scratch, never saw the sample, same seeds
    after, scratch = fitted.shard_state(shard)["stages"], reference.shard_state(shard)["stages"]
    assert [s["data_sha256"] for s in after] == [s["data_sha256"] for s in scratch]
    assert states_equal(fitted.shard_model(shard).state_dict(), reference.shard_model(shard).state_dict())
    assert [s["sha256"] for s in after] == [s["sha256"] for s in scratch]  # model + optimizer state, byte for byte
    # and it did change: the shard trained with the sample differs
    assert after[-1]["sha256"] != result.checkpoints_before[shard][-1]


def test_only_affected_shards_change_and_superseded_checkpoints_go(fitted):
    before = files_of(fitted)
    sample = int(fitted.slices[2][0][0])  # shard 2, slice 0: the whole shard retrains
    result = fitted.forget(ForgetRequest(sample_ids=[sample]))
    after = files_of(fitted)
    untouched = {k: v for k, v in before.items() if not k.startswith("shard_002")}
    assert untouched and all(after[k] == v for k, v in untouched.items())  # bit-identical files
    assert result.affected[2]["slices_retrained"] == CONFIG.slices
    changed = sorted(k for k in after if k.startswith("shard_002/slice_"))
    assert changed == [f"shard_002/slice_{j:03d}.g1.pt" for j in range(CONFIG.slices)]  # nothing that saw it is left
    report = json.loads(result.report_path.read_text())
    assert report["exact"] is True and report["affected_shards"].keys() == {"2"}
    # the same request again is a no-op
    again = fitted.forget(ForgetRequest(sample_ids=[sample]))
    assert again.affected == {} and files_of(fitted) == after


def test_request_touching_several_shards(fitted, train_set, digits):
    ids = [int(fitted.slices[0][2][0]), int(fitted.slices[2][1][0])]
    result = fitted.forget(ForgetRequest(sample_ids=ids))
    assert sorted(result.affected) == [0, 2]
    assert {s: a["first_slice"] for s, a in result.affected.items()} == {0: 2, 2: 1}

    result = fitted.forget(ForgetRequest(classes=[3]), test_dataset=digits[1])
    threes = set(np.flatnonzero(train_set.tensors[1].numpy() == 3).tolist())
    assert sorted(result.affected) == [0, 1, 2] and len(result.sample_ids) == len(threes)
    for s in range(CONFIG.shards):
        deleted = set(fitted.shard_state(s)["deleted"])
        assert threes & set(np.concatenate(fitted.slices[s]).tolist()) <= deleted
        assert not threes & set(fitted.stage_ids(s, CONFIG.slices - 1, deleted).tolist())
    m = result.metrics
    assert m["forget_test_acc"] is not None and m["forget_test_acc"] < 0.05  # no shard model saw a 3
    assert m["remaining_test_acc"] > 0.5


def test_client_request_needs_groups_and_deletes_the_clients_samples(train_set, tmp_path, deterministic):
    groups = np.arange(len(train_set)) % 7
    run = SISA(tmp_path / "run", tiny_cnn, train_set, SISAConfig(shards=2, slices=1, epochs_per_slice=1), groups=groups)
    run.fit()
    with pytest.raises(ValueError, match=r"client id\(s\) \[9\] unknown; allowed ids are \[0, 1, 2, 3, 4, 5, 6\]"):
        run.forget(ForgetRequest(clients=[9]))
    result = run.forget(ForgetRequest(clients=[4]))
    assert np.array_equal(result.sample_ids, np.flatnonzero(groups == 4))
    no_groups = SISA(tmp_path / "run", tiny_cnn, train_set, SISAConfig(shards=2, slices=1, epochs_per_slice=1))
    with pytest.raises(ValueError, match="client request needs a client id per training sample"):
        no_groups.forget(ForgetRequest(clients=[4]))
    with pytest.raises(ValueError, match="subject requests must be resolved to sample ids"):
        no_groups.forget(ForgetRequest(subjects=["alice"]))


def test_stale_checkpoints_are_rejected(fitted, train_set, tmp_path):
    x, y = train_set.tensors
    victim = int(fitted.slices[0][0][3])
    changed = TensorDataset(x.clone(), y.clone())
    changed.tensors[0][victim] += 0.5  # a sample that shard 0's checkpoints were trained on
    stale = SISA(fitted.root, tiny_cnn, changed, CONFIG)
    untouched_shard_sample = int(fitted.slices[0][2][0])
    with pytest.raises(ValueError, match="trained on different data .* refusing to reuse a stale checkpoint"):
        stale.forget(ForgetRequest(sample_ids=[untouched_shard_sample]))
    with pytest.raises(ValueError, match="stale checkpoint"):
        stale.ensemble()

    for stage in (0, -1):  # a checkpoint a deletion resumes from; the one the ensemble serves
        ckpt = fitted.root / "shard_001" / fitted.shard_state(1)["stages"][stage]["file"]
        data = bytearray(ckpt.read_bytes())
        data[len(data) // 2] ^= 0xFF
        ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"changed since it was written \(SHA-256 mismatch\)"):
        fitted.forget(ForgetRequest(sample_ids=[int(fitted.slices[1][1][0])]))
    with pytest.raises(ValueError, match=r"changed since it was written \(SHA-256 mismatch\)"):
        fitted.shard_model(1)
    with pytest.raises(ValueError, match=r"different config \(\{'slices': 3\} there, \{'slices': 2\} now\)"):
        SISA(fitted.root, tiny_cnn, train_set, SISAConfig(shards=3, slices=2, epochs_per_slice=1))
    with pytest.raises(ValueError, match="different model"):
        SISA(fitted.root, SmallCNN, train_set, CONFIG)


def test_erasing_a_deleted_sample_from_storage_keeps_the_run_usable(fitted, train_set):
    """Checkpoints hash only the data they saw: once deleted, a sample may be wiped from the dataset."""
    sample = int(fitted.slices[1][2][1])
    fitted.forget(ForgetRequest(sample_ids=[sample]))
    x, y = train_set.tensors
    wiped = TensorDataset(x.clone(), y.clone())
    wiped.tensors[0][sample] = 0.0
    run = SISA(fitted.root, tiny_cnn, wiped, CONFIG)
    assert len(run.ensemble().models) == CONFIG.shards
    run.forget(ForgetRequest(sample_ids=[int(fitted.slices[1][2][0])]))  # resumes from verified checkpoints


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own deprecation inside Trainer.test
def test_ensemble_round_trip_and_aggregations(fitted, digits, tmp_path):
    x = digits[1].tensors[0][:200]
    for aggregation in ("mean_proba", "vote"):
        ensemble = fitted.ensemble(aggregation)
        before = ensemble(x)
        ensemble.save(tmp_path / f"{aggregation}.pt")
        for loaded in (SISAEnsemble.load(tmp_path / f"{aggregation}.pt"),
                       SISAEnsemble.load(tmp_path / f"{aggregation}.pt", model_factory=tiny_cnn)):
            assert loaded.aggregation == aggregation and loaded.shard_ids == [0, 1, 2]
            assert torch.equal(loaded(x), before)
    # vote: the majority of the shard models' argmax, ties to the larger mean probability
    ensemble = fitted.ensemble("vote")
    votes = torch.stack([m(x).argmax(-1) for m in ensemble.models])
    majority = torch.stack([torch.bincount(v, minlength=10) for v in votes.T]).max(-1).values
    chosen = ensemble(x).argmax(-1)
    assert torch.equal((votes == chosen).sum(0), majority)
    ensemble = fitted.ensemble("mean_proba")
    assert torch.allclose(ensemble(x).exp().sum(-1), torch.ones(len(x)), atol=1e-5)  # log of a distribution
    loader = DataLoader(digits[1], batch_size=512)
    with quiet_lightning():  # evaluated like any LightningModule
        tested = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            ensemble, loader, verbose=False)
    assert tested[0]["test_acc"] == pytest.approx(accuracy(ensemble, loader, 10), abs=1e-6)
    with pytest.raises(ValueError, match=r"unknown aggregation 'max'; allowed values are \['mean_proba', 'vote'\]"):
        SISAEnsemble(ensemble.models, "max")


def test_settings_fail_fast(train_set, tmp_path):
    with pytest.raises(ValueError, match="shards must be an integer >= 1, got 0"):
        SISAConfig(shards=0)
    with pytest.raises(ValueError, match=r"shards x slices = 100 x 20 = 2000 is more than the 1347"):
        SISA(tmp_path, tiny_cnn, train_set, SISAConfig(shards=100, slices=20))
    assert not (tmp_path / "plan.json").exists()  # before any work
    run = SISA(tmp_path, tiny_cnn, train_set, SISAConfig(shards=2))
    with pytest.raises(ValueError, match=r"shard id\(s\) \[2\] out of range; allowed ids are 0..1"):
        run.fit(shards=[2])
    with pytest.raises(ValueError, match=r"shard\(s\) \[0, 1\] are not fully trained"):
        run.forget(ForgetRequest(sample_ids=[0]))
    with pytest.raises(ValueError, match=r"sample id\(s\) \[5000\] out of range"):
        run.forget(ForgetRequest(sample_ids=[5000]))


CLI_CONFIG = """\
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, max_epochs: 2}
model:
  class_path: lightning_unlearn.models.SmallCNN
  init_args: {channels: [4, 8], hidden: 16, lr: 0.01}
data:
  class_path: lightning_unlearn.data.presets.DigitsData
  init_args: {forget_classes: [3], batch_size: 64}
"""


@pytest.mark.slow
def test_cli_two_shard_processes_in_parallel_then_unlearn_and_evaluate(tmp_path, train_set, capsys, one_thread):
    config = tmp_path / "sisa.yaml"
    config.write_text(CLI_CONFIG)
    base = ["--config", str(config), "--sisa.dir", str(tmp_path / "run")]
    fit = [sys.executable, "-m", "lightning_unlearn.cli", "sisa", "fit", *base, "--sisa.shards", "2", "--sisa.slices", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([*fit, "--sisa.shard_ids", f"[{k}]"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "shard 0: trained" in outs[0][0] and "shard 1: trained" in outs[1][0]

    # the two processes together wrote exactly what one process writes
    sequential = SISA(tmp_path / "seq", lambda: SmallCNN(**TINY), train_set,
                      SISAConfig(shards=2, slices=2, epochs_per_slice=1, batch_size=64, seed=0))
    sequential.fit()
    parallel = {str(p.relative_to(tmp_path / "run")): file_sha256(p) for p in (tmp_path / "run").glob("shard_*/*")}
    assert parallel == files_of(sequential)  # checkpoints and shard states, byte for byte

    assert sisa_main(["unlearn", *base]) == 0  # settings come from the run's plan
    out = capsys.readouterr().out
    assert "deleted {'kind': 'class', 'classes': [3]}" in out and "ensemble forget_acc" in out
    assert sisa_main(["evaluate", *base, "--sisa.export", str(tmp_path / "ens.pt")]) == 0
    assert "ensemble (mean_proba, 2 shards) test accuracy" in capsys.readouterr().out
    assert len(SISAEnsemble.load(tmp_path / "ens.pt").models) == 2

    assert sisa_main(["fit", *base, "--sisa.slices", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-unlearn: error: ") and "different config" in err and "\n" not in err
    assert sisa_main(["fit", *base, "--sisa.shard_ids", "[7]"]) == 2
    assert "shard id(s) [7] out of range" in capsys.readouterr().err


def test_ledger_records_sisa_deletions_as_exact_and_verify_passes(fitted, train_set, digits, tmp_path):
    from lightning_unlearn.exact.serving import record_fit, serve_requests
    from lightning_unlearn.ledger import Ledger, verify
    from lightning_unlearn.ledger.identity import sample_hashes

    with Ledger(tmp_path / "ledger.db") as ledger:
        source = ledger.register_source("digits", sample_hashes(train_set),
                                        subjects=[f"person-{i % 50}" for i in range(len(train_set))])
        first = record_fit(fitted, ledger, source, tmp_path / "v1.pt")
        assert serve_requests(fitted, ledger, source, None, tmp_path / "jobs") == {"status": "idle"}
        request_id = ledger.add_request(source, ForgetRequest(subjects=["person-7"]), requester="person-7")
        outcome = serve_requests(fitted, ledger, source, digits[1], tmp_path / "jobs")
        assert outcome["status"] == "done"
        subject_ids = [i for i in range(len(train_set)) if i % 50 == 7]
        assert set(subject_ids) <= set(fitted.deleted_ids().tolist())
        assert ledger.request(request_id)["status"] == "done"
        evidence = ledger.evidence(outcome["job"])
        assert evidence["method"] == "sisa" and evidence["metrics"]["exact"] is True
        assert json.loads(evidence["report_json"])["exact"] is True
        assert ledger.version(outcome["version"])["parent_id"] == first
        assert np.array_equal(ledger.held(outcome["version"]), fitted.held_ids())
        checks = verify(ledger, [request_id])
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]


# -- issue 21: deletions that stay deleted ---------------------------------------------------------------------------
FORK = multiprocessing.get_context("fork")  # forked children skip the interpreter start and the imports


def _forget_in_child(run: SISA, sample: int, barrier) -> None:
    barrier.wait(timeout=60)
    run.forget(ForgetRequest(sample_ids=[sample]))


def test_two_concurrent_deletions_on_one_run_both_land(fitted, train_set, tmp_path):
    """Two processes deleting from the same shard at once: both deletions land, and no report claims more."""
    shard = 0
    first, second = (int(i) for i in fitted.slices[shard][0][:2])  # slice 0: each retrains the whole shard
    barrier = FORK.Barrier(2)
    children = [FORK.Process(target=_forget_in_child, args=(fitted, s, barrier)) for s in (first, second)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=240)
    assert [c.exitcode for c in children] == [0, 0]
    deleted = set(fitted.shard_state(shard)["deleted"])
    assert {first, second} <= deleted
    reports = [json.loads(p.read_text()) for p in sorted((fitted.root / "reports").glob("deletion*.json"))]
    assert len(reports) == 2
    for report in reports:  # every report's claim is in the state the ensemble is served from
        assert report["num_samples_removed"] == 1 and set(report["request"]["sample_ids"]) <= deleted
    # and in the weights: the shard equals one trained from scratch without both samples
    reference = SISA(tmp_path / "scratch", tiny_cnn, train_set, CONFIG)
    reference.fit(shards=[shard], exclude=[first, second])
    assert states_equal(fitted.shard_model(shard).state_dict(), reference.shard_model(shard).state_dict())


def test_a_failed_deletion_changes_nothing_and_the_rerun_completes_it(fitted, digits):
    """Every file a deletion reads is checked before any work; after a failure the run is as it was."""
    sample = int(fitted.slices[1][1][0])
    other = fitted.root / "shard_002" / fitted.shard_state(2)["stages"][-1]["file"]  # read by the evaluation
    good = other.read_bytes()
    other.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    before = files_of(fitted)
    with pytest.raises(ValueError, match=r"shard_002/slice_002\.g0\.pt changed since it was written"):
        fitted.forget(ForgetRequest(sample_ids=[sample]), test_dataset=digits[1])
    assert files_of(fitted) == before  # no state written, no checkpoint retrained or swept
    assert not (fitted.root / "reports").exists()
    other.write_bytes(good)
    result = fitted.forget(ForgetRequest(sample_ids=[sample]), test_dataset=digits[1])
    report = json.loads(result.report_path.read_text())
    assert report["num_samples_removed"] == 1 and sample in fitted.shard_state(1)["deleted"]


def test_a_failure_while_retraining_leaves_every_shard_state_unchanged(fitted, monkeypatch):
    """A request over two shards that fails on the second: the first shard's state is not committed alone."""
    ids = [int(fitted.slices[0][1][0]), int(fitted.slices[2][1][0])]
    before = {s: fitted.shard_state(s) for s in range(CONFIG.shards)}
    real, calls = SISA._train_stage, []

    def fail_on_second_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > CONFIG.slices - 1:  # shard 0 retrained slices 1..2; shard 2 fails
            raise RuntimeError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SISA, "_train_stage", fail_on_second_shard)
    with pytest.raises(RuntimeError, match="out of memory"):
        fitted.forget(ForgetRequest(sample_ids=ids))
    assert {s: fitted.shard_state(s) for s in range(CONFIG.shards)} == before
    monkeypatch.setattr(SISA, "_train_stage", real)
    result = fitted.forget(ForgetRequest(sample_ids=ids))  # the rerun removes both
    assert sorted(result.affected) == [0, 2] and result.to_dict()["num_samples_removed"] == 2
    assert not [p for p in fitted.root.glob("shard_*/slice_*.pt")
                if p.name not in {st["file"] for s in range(3) for st in fitted.shard_state(s)["stages"]}]


def test_corrupt_run_files_are_named_in_one_line(fitted, train_set, tmp_path, capsys):
    state_file = fitted.root / "shard_001" / "state.json"
    good = state_file.read_text()
    before = files_of(fitted)
    untouched_shard_sample = int(fitted.slices[0][0][0])
    for text, problem in ((good.replace(",", "", 1), r"is not valid JSON \(Expecting ',' delimiter: line \d+ column \d+"),
                          ('{"shard": 1, "generation": 0, "deleted": "all", "stages": []}', "is malformed: deleted must be a list"),
                          (good.replace('"slice_000.g0.pt"', '"../../escape.pt"'), "is malformed: stage 0: file must be a checkpoint name")):
        state_file.write_text(text)
        for action in (lambda: fitted.forget(ForgetRequest(sample_ids=[untouched_shard_sample])), fitted.ensemble):
            with pytest.raises(ValueError, match=rf"SISA shard state {state_file} {problem}") as info:
                action()
            assert "\n" not in str(info.value)
    state_file.write_text(good)
    assert files_of(fitted) == before  # the deletion did nothing while a state was unreadable

    plan = fitted.root / "plan.json"
    plan.write_text(plan.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"SISA plan {plan} is not valid JSON"):
        SISA(fitted.root, tiny_cnn, train_set, CONFIG)
    config = tmp_path / "sisa.yaml"
    config.write_text(CLI_CONFIG)
    assert sisa_main(["unlearn", "--config", str(config), "--sisa.dir", str(fitted.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lightning-unlearn: error: SISA plan {plan} is not valid JSON") and "\n" not in err
    plan.write_text('{"format": "lightning-unlearn/sisa/1"}')
    with pytest.raises(ValueError, match=rf"SISA plan {plan} lacks config"):
        SISA.stored_config(fitted.root)



def _serve_in_child(run: SISA, db: str, jobs: str, claimed, go) -> None:
    from lightning_unlearn import ledger as ledger_mod
    from lightning_unlearn.exact.serving import serve_requests

    real = run.forget

    def forget_when_told(*args, **kwargs):
        if claimed is not None:  # the first server: hold its claim until the second one has started
            claimed.set()
            go.wait(timeout=60)
        return real(*args, **kwargs)

    run.forget = forget_when_told
    with ledger_mod.Ledger(db) as ledger:
        assert serve_requests(run, ledger, "digits", None, jobs)["status"] == "done"


def test_two_ledger_servers_on_one_run_serve_both_requests(fitted, train_set, tmp_path):
    """`sisa unlearn --sisa.ledger` twice at once: the second claims its request only after the first is recorded."""
    from lightning_unlearn import ledger as ledger_mod
    from lightning_unlearn.exact.serving import record_fit
    from lightning_unlearn.ledger.identity import sample_hashes

    db = str(tmp_path / "ledger.db")
    with ledger_mod.Ledger(db) as ledger:
        source = ledger.register_source("digits", sample_hashes(train_set))
        record_fit(fitted, ledger, source, tmp_path / "v1.pt")
        first = ledger.add_request(source, ForgetRequest(sample_ids=[int(fitted.slices[0][1][0])]), "alice")
    claimed, go = FORK.Event(), FORK.Event()
    a = FORK.Process(target=_serve_in_child, args=(fitted, db, str(tmp_path / "jobs"), claimed, go))
    a.start()
    assert claimed.wait(timeout=120)
    with ledger_mod.Ledger(db) as ledger:
        second = ledger.add_request(source, ForgetRequest(sample_ids=[int(fitted.slices[2][1][0])]), "bob")
    b = FORK.Process(target=_serve_in_child, args=(fitted, db, str(tmp_path / "jobs"), None, None))
    b.start()
    b.join(timeout=2)  # time for it to claim, if nothing stops it
    go.set()
    for child in (a, b):
        child.join(timeout=240)
    assert [a.exitcode, b.exitcode] == [0, 0]
    with ledger_mod.Ledger(db) as ledger:
        assert [ledger.request(r)["status"] for r in (first, second)] == ["done", "done"]
        head = ledger.head("digits")["id"]
        assert np.array_equal(ledger.held(head), fitted.held_ids())  # the ledger records what the run holds
        checks = ledger_mod.verify(ledger)
        assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
