"""The request ledger on a real database: lineage from a real fit, batching, kill-and-rerun, concurrency, verify.

Every test runs on a SQLite file; set LIGHTNING_UNLEARN_TEST_DB_URL=postgresql+psycopg://... to run
each one against a PostgreSQL server too (its tables are dropped and recreated per test).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from torch.utils.data import DataLoader, Subset

from lightning_unlearn import ForgetRequest
from lightning_unlearn._training import fit
from lightning_unlearn.data import load_digits_datasets
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.evidence.report import weights_sha256
from lightning_unlearn.ledger import Ledger, RecordLineage, run_pending, verify
from lightning_unlearn.ledger.lineage import record_federated
from lightning_unlearn.ledger.identity import sample_hashes
from lightning_unlearn.ledger import schema
from lightning_unlearn.ledger.cli import main as requests_main
from lightning_unlearn.ledger.store import from_ranges, to_ranges
from lightning_unlearn.models import SmallCNN

PG_URL = os.environ.get("LIGHTNING_UNLEARN_TEST_DB_URL")
QUICK = dict(unlearn_kwargs={"max_steps": 3}, evaluate_kwargs={"max_samples": 200})


class TrainOn(pl.LightningDataModule):
    def __init__(self, dataset, shuffle: bool = True, batch_size: int = 64):
        super().__init__()
        self.dataset, self.shuffle, self.batch_size = dataset, shuffle, batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                          generator=torch.Generator().manual_seed(0) if self.shuffle else None)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    if not PG_URL:
        pytest.skip("PostgreSQL case: set LIGHTNING_UNLEARN_TEST_DB_URL=postgresql+psycopg://... to run it")
    engine = create_engine(PG_URL)
    with engine.begin() as conn:  # a fresh ledger for every test
        schema.metadata.drop_all(conn)
    engine.dispose()
    return PG_URL


def _fit_version(db_url, digits, tmp_path, epochs=2, **lineage) -> tuple[SmallCNN, RecordLineage]:
    pl.seed_everything(0, verbose=False)
    model = SmallCNN()
    cb = RecordLineage(db_url, "digits", weights_path=str(tmp_path / "trained.pt"), **lineage)
    fit(model, TrainOn(digits[0]), epochs=epochs, callbacks=[cb])
    return model, cb


def test_ranges_roundtrip():
    ids = np.array([9, 0, 1, 2, 5, 6, 2])
    assert to_ranges(ids) == [(0, 3), (5, 7), (9, 10)]
    assert from_ranges(to_ranges(ids)).tolist() == [0, 1, 2, 5, 6, 9]
    assert to_ranges([]) == []


def test_lineage_recorded_by_a_real_fit(db_url, digits, tmp_path, one_thread):
    train = digits[0]
    model, cb = _fit_version(db_url, digits, tmp_path, demo_subjects=50)
    with Ledger(db_url) as ledger:
        (vid,) = cb.versions
        version = ledger.version(vid)
        assert version["weights_sha256"] == weights_sha256(model) == weights_sha256(tmp_path / "trained.pt")
        assert version["checkpoint_path"] == str((tmp_path / "trained.pt").resolve())
        assert version["num_trained"] == len(train) and version["parent_id"] is None
        assert ledger.sample_hashes("digits") == sample_hashes(train)
        assert (ledger.lineage(vid) == 1).all()  # two full shuffled epochs draw every sample

        # a second fit continues from those weights on the first 1000 samples, stopped after 3 sequential batches
        cb2 = RecordLineage(db_url, "digits")
        fit(model, TrainOn(Subset(train, range(1000)), shuffle=False), epochs=1, callbacks=[cb2],
            trainer_kwargs={"max_steps": 3})
        (vid2,) = cb2.versions
        assert ledger.version(vid2)["parent_id"] == vid  # found by its starting weights
        assert ledger.version(vid2)["num_trained"] == 3 * 64  # exactly the samples drawn
        assert ledger.version(vid2)["checkpoint_path"] is None

        # a fresh model on a subset never saw the rest
        fresh = SmallCNN()
        cb3 = RecordLineage(db_url, "digits")
        fit(fresh, TrainOn(Subset(train, range(500, 1000))), epochs=1, callbacks=[cb3])
        state = ledger.lineage(cb3.versions[0], [0, 499, 500, 999, 1000])
        assert state.tolist() == [0, 0, 1, 1, 0]

        # the same name with different data is refused
        changed = torch.utils.data.TensorDataset(train.tensors[0] + 1, train.tensors[1])
        with pytest.raises(ValueError, match="its data changed"):
            ledger.register_source("digits", sample_hashes(changed))


def test_lineage_with_model_checkpoint_files(db_url, digits, tmp_path, one_thread):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    model = SmallCNN()
    cb = RecordLineage(db_url, "digits")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(model, TrainOn(digits[0]), epochs=2, callbacks=[cb, ckpt], trainer_kwargs={"enable_checkpointing": True})
    with Ledger(db_url) as ledger:
        versions = [ledger.version(v) for v in cb.versions]
    assert len(versions) == 2  # one per kept checkpoint file, each with its own file and hash
    assert versions[-1]["weights_sha256"] == weights_sha256(model)
    for v in versions:
        state = torch.load(v["checkpoint_path"], weights_only=True)["state_dict"]
        assert weights_sha256(state) == v["weights_sha256"]


def test_subject_csv_and_bad_requests_are_rejected(db_url, digits, tmp_path, one_thread):
    csv_path = tmp_path / "subjects.csv"
    csv_path.write_text("sample_index,subject_id\n" + "".join(f"{i},alice\n" for i in range(5)) + "7,bob\n")
    _fit_version(db_url, digits, tmp_path, epochs=1, subjects=str(csv_path))
    with Ledger(db_url) as ledger:
        assert ledger.resolve(ForgetRequest(subjects=["alice", "bob"]), "digits").sample_ids == (0, 1, 2, 3, 4, 7)
        with pytest.raises(ValueError, match=r"unknown subject\(s\) \['carol', 'dave'\]"):
            ledger.add_request("digits", ForgetRequest(subjects=["alice", "carol", "dave"]), "x")
        with pytest.raises(ValueError, match=r"unknown sample id\(s\) \[5000\].*allowed ids are 0\.\.1346"):
            ledger.add_request("digits", ForgetRequest(sample_ids=[3, 5000]), "x")
        with pytest.raises(ValueError, match=r"unknown client\(s\) \[2\]"):
            ledger.add_request("digits", ForgetRequest(clients=[2]), "x")
        with pytest.raises(ValueError, match="kind.*'class'"):
            ledger.add_request("digits", ForgetRequest(classes=[3]), "x")
        with pytest.raises(ValueError, match="unknown data source 'mnist'"):
            ledger.add_request("mnist", ForgetRequest(sample_ids=[1]), "x")
        with pytest.raises(ValueError, match="requester"):
            ledger.add_request("digits", ForgetRequest(sample_ids=[1]), " ")
        assert ledger.requests() == []  # nothing landed


def test_batch_run_verify_and_lineage(db_url, digits, tmp_path, one_thread):
    _, cb = _fit_version(db_url, digits, tmp_path, demo_subjects=50)
    with Ledger(db_url) as ledger:
        r1 = ledger.add_request("digits", ForgetRequest(subjects=["user-7"]), "user 7")
        r2 = ledger.add_request("digits", ForgetRequest(sample_ids=[1, 2, 3]), "auditor")
        subject_ids = ledger.request(r1)["sample_ids"]
        out = run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        assert out.status == "done" and out.request_ids == (r1, r2)
        rows = ledger.requests()
        assert {r["status"] for r in rows} == {"done"} and {r["version_after_id"] for r in rows} == {out.version_id}
        assert [v["id"] for v in ledger.versions("digits")] == [cb.versions[0], out.version_id]  # one job, one version
        forget = sorted(set(subject_ids) | {1, 2, 3})
        report = json.loads(out.report_path.read_text())
        assert report["request"]["sample_ids"] == forget
        assert (ledger.lineage(out.version_id, forget) == 2).all()
        assert len(ledger.held(out.version_id)) == len(digits[0]) - len(forget)
        assert all(c.ok for c in verify(ledger)), [c for c in verify(ledger) if not c.ok]

        assert run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK).status == "idle"
        # the new head no longer holds these samples: closed without a new model, and verifiable
        r3 = ledger.add_request("digits", ForgetRequest(sample_ids=[2]), "auditor")
        again = run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        assert again.status == "unchanged" and ledger.request(r3)["version_after_id"] == out.version_id
        assert all(c.ok for c in verify(ledger, [r3]))

        # a second batch starts from the new head and keeps earlier deletions out of its retain set
        r4 = ledger.add_request("digits", ForgetRequest(sample_ids=[10]), "auditor")
        third = run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        assert ledger.version(third.version_id)["parent_id"] == out.version_id
        assert ledger.request(r4)["status"] == "done"
        assert (ledger.lineage(third.version_id, forget + [10]) == 2).all()


def test_verify_catches_tampered_weights_and_report(db_url, digits, tmp_path, one_thread):
    _fit_version(db_url, digits, tmp_path)
    with Ledger(db_url) as ledger:
        ledger.add_request("digits", ForgetRequest(sample_ids=[4, 5]), "auditor")
        out = run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        assert all(c.ok for c in verify(ledger))
        weights_path = Path(ledger.version(out.version_id)["checkpoint_path"])
        original = weights_path.read_bytes()
        state = torch.load(weights_path, weights_only=True)
        state["fc2.bias"][0] += 1e-3
        torch.save(state, weights_path)
        failed = {c.name for c in verify(ledger) if not c.ok}
        assert failed == {"weights hash = ledger version"}
        weights_path.write_bytes(original)

        report = json.loads(out.report_path.read_text())
        report["metrics"]["unlearned"]["forget_acc"] = 0.0  # a nicer-looking number
        out.report_path.write_text(json.dumps(report, indent=2))
        failed = {c.name for c in verify(ledger) if not c.ok}
        assert failed == {"report hash = ledger evidence", "report = stored copy"}


def test_finished_rows_are_append_only(db_url, digits, tmp_path, one_thread):
    _fit_version(db_url, digits, tmp_path, epochs=1)
    with Ledger(db_url) as ledger:
        done_id = ledger.add_request("digits", ForgetRequest(sample_ids=[4]), "auditor")
        run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        open_id = ledger.add_request("digits", ForgetRequest(sample_ids=[8]), "auditor")
        ledger.update_request(open_id, note="ticket 17")  # a request not finished yet may be annotated
        assert ledger.request(open_id)["note"] == "ticket 17"
        with pytest.raises(PermissionError, match="append-only"):
            ledger.update_request(done_id, note="rewritten")
        with pytest.raises(ValueError, match="editable fields"):
            ledger.update_request(open_id, status="done")
        for statement in (f"UPDATE requests SET requester = 'x' WHERE id = {done_id}",
                          f"DELETE FROM requests WHERE id = {done_id}",
                          "UPDATE evidence SET report_sha256 = 'x'",
                          "UPDATE model_versions SET weights_sha256 = 'x'"):
            with pytest.raises(DBAPIError, match="append-only"):
                with ledger.engine.begin() as conn:
                    conn.execute(text(statement))
        assert ledger.request(done_id)["requester"] == "auditor"


def test_schema_version_is_recorded_and_newer_databases_refused(db_url):
    with Ledger(db_url) as ledger:
        with ledger.engine.begin() as conn:
            assert schema.current_version(conn) == schema.SCHEMA_VERSION
    with Ledger(db_url) as ledger:  # opening again applies nothing twice
        with ledger.engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM schema_version")).scalar() == schema.SCHEMA_VERSION
            conn.execute(text("INSERT INTO schema_version (version, description, applied_at) "
                              "VALUES (99, 'from the future', CURRENT_TIMESTAMP)"))
    with pytest.raises(ValueError, match="schema version 99.*upgrade lightning-unlearn"):
        Ledger(db_url)


def test_federated_lineage_records_clients(db_url, digits, one_thread):
    fdm = FederatedDataModule(digits[0], digits[1], num_clients=3, partition="iid", seed=0)
    fdm.setup("fit")
    model = SmallCNN()
    history = [{"round": 0, "clients": [0, 2]}, {"round": 1, "clients": [2]}]  # FedAvgResult.history rows
    with Ledger(db_url) as ledger:
        vid = record_federated(ledger, "digits-fed", fdm, history, model)
        version = ledger.version(vid)
        assert version["clients"] == {0: 1, 2: 2}
        client1 = np.sort(fdm.client_indices(1))
        assert (ledger.lineage(vid, client1) == 0).all()  # never took part: its data never reached the model
        assert (ledger.lineage(vid, fdm.client_indices(2)) == 1).all()
        assert ledger.resolve(ForgetRequest(clients=[1]), "digits-fed").sample_ids == tuple(client1.tolist())
        with pytest.raises(ValueError, match=r"unknown client\(s\) \[7\]"):
            ledger.resolve(ForgetRequest(clients=[7]), "digits-fed")


# The runs below are real child processes (forked, so they skip the interpreter start and imports: on
# two shared cores a fresh `import lightning` alone can take 10 s), killed with SIGKILL at the points named.
FORK = multiprocessing.get_context("fork")


def _run_until_killed(url: str, out: str, point: str) -> None:
    from lightning_unlearn.evidence.report import UnlearningReport
    from lightning_unlearn.ledger import runner, store

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before_unlearning":
        runner.unlearn = die  # requests claimed, nothing written
    elif point == "before_report":
        UnlearningReport.save = die  # weights and mask on disk, no report
    elif point == "before_ledger_commit":
        store.Ledger.finish_job = die  # every output on disk, the ledger not told
    train, test = load_digits_datasets(seed=0)
    runner.run_pending(Ledger(url), "digits", SmallCNN(), train, test, out, **QUICK)


@pytest.mark.slow
def test_run_killed_at_any_point_leaves_the_ledger_consistent(db_url, digits, tmp_path, one_thread):
    _fit_version(db_url, digits, tmp_path, epochs=1)
    jobs_dir = tmp_path / "jobs"
    with Ledger(db_url) as ledger:
        ids = [ledger.add_request("digits", ForgetRequest(sample_ids=[i, i + 100]), "auditor") for i in range(3)]
        job_ids = []
        for point in ("before_unlearning", "before_report", "before_ledger_commit"):
            child = FORK.Process(target=_run_until_killed, args=(db_url, str(jobs_dir), point))
            child.start()
            child.join(timeout=240)
            assert child.exitcode == -signal.SIGKILL, f"{point}: exit code {child.exitcode}"
            running = ledger.jobs(status="running")
            assert len(running) == 1
            job_ids.append(running[0]["id"])
            assert {r["status"] for r in ledger.requests()} == {"running"}  # never done without outputs
            assert len(ledger.versions("digits")) == 1
        assert not ledger.job(job_ids[0]).output_dir.exists()
        assert not ledger.job(job_ids[1]).output_dir.exists()  # the third run discarded the weights-without-report
        assert (ledger.job(job_ids[2]).output_dir / "selective.report.json").exists()

        out = run_pending(ledger, "digits", SmallCNN(), *digits, jobs_dir, **QUICK)
        assert out.status == "idle" and out.recovered == [(job_ids[2], "finalised")]  # no retraining needed
        statuses = {j["id"]: j["status"] for j in ledger.jobs()}
        assert statuses == {job_ids[0]: "abandoned", job_ids[1]: "abandoned", job_ids[2]: "done"}
        assert {r["status"] for r in ledger.requests(ids=ids)} == {"done"}
        assert len(ledger.versions("digits")) == 2
        assert all(c.ok for c in verify(ledger))


def _add_fifty(url: str, tag: str, barrier) -> None:
    ledger = Ledger(url)  # its own engine and connections
    barrier.wait(timeout=60)
    for i in range(50):
        ledger.add_request("shared", ForgetRequest(sample_ids=[i]), f"{tag}-{i}")


def test_two_processes_adding_at_once_both_land(db_url):
    with Ledger(db_url) as ledger:
        ledger.register_source("shared", [f"{i:064x}" for i in range(100)])
    barrier = FORK.Barrier(2)
    children = [FORK.Process(target=_add_fifty, args=(db_url, tag, barrier)) for tag in "ab"]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    with Ledger(db_url) as ledger:
        rows = ledger.requests(source="shared")
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    assert sorted(r["requester"] for r in rows) == sorted(f"{t}-{i}" for t in "ab" for i in range(50))


def test_cli_session(db_url, digits, tmp_path, capsys, one_thread):
    _fit_version(db_url, digits, tmp_path, demo_subjects=50)
    config = tmp_path / "digits.yaml"
    config.write_text(textwrap.dedent("""
        seed_everything: 0
        trainer: {max_epochs: 1}
        model: {class_path: lightning_unlearn.models.SmallCNN}
        data:
          class_path: lightning_unlearn.data.presets.DigitsData
          init_args: {forget_classes: [3], batch_size: 64}
    """))
    db = ["--db", db_url]
    assert requests_main(["add", *db, "--source", "digits", "--subject", "user-42", "--requester", "user 42"]) == 0
    assert requests_main(["add", *db, "--source", "digits", "--sample-id", "5", "17", "--requester", "auditor"]) == 0
    assert "request 2 received: sample 5, 17 -> 2 sample(s)" in capsys.readouterr().out
    assert requests_main(["add", *db, "--source", "digits", "--subject", "nobody", "--requester", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-unlearn: error: unknown subject(s) ['nobody']") and err.count("\n") == 1
    assert requests_main(["add", *db, "--source", "digits", "--requester", "x"]) == 2
    assert capsys.readouterr().err.startswith("lightning-unlearn: error: one of the arguments")
    assert requests_main(["list", *db]) == 0
    assert "user-42" in capsys.readouterr().out
    assert requests_main(["run", *db, "--config", str(config), "--output-dir", str(tmp_path / "jobs"),
                          "--max-steps", "3"]) == 0
    assert "requests [1, 2] done" in capsys.readouterr().out
    assert requests_main(["verify", *db]) == 0
    assert "14/14 checks passed" in capsys.readouterr().out  # 12 on the job, 1 per request on later versions
    assert requests_main(["lineage", *db, "2", "--subject", "user-42"]) == 0
    assert "trained, then unlearned" in capsys.readouterr().out
    assert requests_main(["export", *db, "--output", str(tmp_path / "audit.json")]) == 0
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert [r["status"] for r in audit["requests"]] == ["done", "done"]
    assert audit["requests"][0]["evidence"]["weights_sha256"] == audit["requests"][0]["version_after"]["weights_sha256"]
    assert requests_main(["export", *db, "--request", "2", "--output", str(tmp_path / "audit.csv")]) == 0
    lines = (tmp_path / "audit.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("2,done,sample,5 17,2,auditor")
    assert requests_main(["export", *db, "--output", str(tmp_path / "audit.csv")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert requests_main(["show", *db, "1"]) == 0
    assert "user-42" in capsys.readouterr().out


# -- issue 21: deletions that stay deleted ---------------------------------------------------------------------------
RUN_CONFIG = """
seed_everything: 0
trainer: {max_epochs: 1}
model: {class_path: lightning_unlearn.models.SmallCNN}
data:
  class_path: lightning_unlearn.data.presets.DigitsData
  init_args: {forget_classes: [3], batch_size: 64}
"""


def test_an_old_version_never_brings_deleted_data_back(db_url, digits, tmp_path, capsys, one_thread):
    _, cb = _fit_version(db_url, digits, tmp_path, epochs=1, demo_subjects=50)
    (first,) = cb.versions
    config = tmp_path / "digits.yaml"
    config.write_text(RUN_CONFIG)
    db = ["--db", db_url]
    with Ledger(db_url) as ledger:
        r1 = ledger.add_request("digits", ForgetRequest(subjects=["user-42"]), "user 42")
        deleted = ledger.request(r1)["sample_ids"]
        second = run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK).version_id
        r2 = ledger.add_request("digits", ForgetRequest(sample_ids=[5]), "auditor")

    # serving the new request on version 1 would train user-42's samples back in: refused before any work
    assert requests_main(["run", *db, "--config", str(config), "--output-dir", str(tmp_path / "jobs"),
                          "--version", str(first)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lightning-unlearn: error:")]
    assert len(err) == 1, err  # (after the progress lines)
    err = err[0]
    assert (f"model version {first} still holds {len(deleted)} sample(s) of done request(s) [{r1}]" in err
            and f"--version {second}" in err)
    with Ledger(db_url) as ledger:
        assert ledger.request(r2)["status"] == "received" and ledger.jobs(status="running") == []
        assert [v["id"] for v in ledger.versions("digits")] == [first, second]

        # a version recorded later from version 1's weights (a fine-tune of the old model) holds them again:
        # verify fails, naming it, and no request is served on it
        v1 = ledger.version(first)
        third = ledger.record_version("digits", v1["weights_sha256"], np.arange(len(digits[0])),
                                      checkpoint_path=v1["checkpoint_path"], parent_id=first)
        failed = [c for c in verify(ledger) if not c.ok]
        assert [(c.request_ids, c.name) for c in failed] == [((r1,), "later versions keep the deletion")]
        assert f"version {third} holds {len(deleted)} of its {len(deleted)} sample(s)" in failed[0].detail
        with pytest.raises(ValueError, match=rf"model version {third} still holds .* request\(s\) \[{r1}\]"):
            run_pending(ledger, "digits", SmallCNN(), *digits, tmp_path / "jobs", **QUICK)
        assert ledger.request(r2)["status"] == "received"


def test_two_jobs_on_one_version_cannot_both_become_the_head(db_url, tmp_path):
    """Compare-and-swap on the version chain: a job finished on a superseded version would drop a deletion."""
    with Ledger(db_url) as ledger:
        source = ledger.register_source("shared", [f"{i:064x}" for i in range(100)])
        base = ledger.record_version(source, "a" * 64, np.arange(100), checkpoint_path=str(tmp_path / "v1.pt"))
        r1 = ledger.add_request(source, ForgetRequest(sample_ids=[1, 2]), "alice")
        job_a = ledger.start_job(source, tmp_path / "jobs")
        r2 = ledger.add_request(source, ForgetRequest(sample_ids=[3]), "bob")
        job_b = ledger.start_job(source, tmp_path / "jobs")  # another worker, on the same head
        assert job_a.version_id == job_b.version_id == base

        def finish(job, tag):
            return ledger.finish_job(job, weights_sha256=tag * 64, weights_path=tmp_path / f"{tag}.pt",
                                     report_path=tmp_path / f"{tag}.json", report_text="{}", method="test",
                                     metrics={}, attacks={},
                                     trained_ids=np.setdiff1d(ledger.held(job.version_id), job.forget_ids))

        second = finish(job_a, "b")
        with pytest.raises(ValueError, match=rf"model version {base} was superseded .* request\(s\) \[{r1}\]"):
            finish(job_b, "c")
        assert [v["id"] for v in ledger.versions(source)] == [base, second]
        assert ledger.request(r2)["status"] == "received"  # back in the queue, for the new head
        assert {j["id"]: j["status"] for j in ledger.jobs()} == {job_a.id: "done", job_b.id: "abandoned"}
        job_c = ledger.start_job(source, tmp_path / "jobs")
        assert job_c.version_id == second and job_c.request_ids == (r2,)
        finish(job_c, "d")
        assert (ledger.lineage(ledger.head(source)["id"], [1, 2, 3]) == 2).all()


def test_commands_on_a_missing_or_foreign_ledger_refuse_without_creating_it(tmp_path, capsys):
    typo = tmp_path / "some" / "dir" / "ledgr.db"
    commands = [["verify"], ["list"], ["export", "--output", str(tmp_path / "audit.json")], ["show", "1"],
                ["lineage", "1"], ["deploy", "1", "--by", "ops"],
                ["add", "--source", "digits", "--sample-id", "1", "--requester", "x"],
                ["run", "--config", str(tmp_path / "none.yaml")]]
    for args in commands:
        assert requests_main([*args, "--db", str(typo)]) == 2, args
        err = capsys.readouterr().err
        assert err == f"lightning-unlearn: error: no ledger at {typo}: the file does not exist (check --db)\n", args
    assert not (tmp_path / "some").exists() and not (tmp_path / "audit.json").exists()
    for content in (b"", b"not a database at all"):  # a file that is not a ledger is left as it was
        other = tmp_path / "other.db"
        other.write_bytes(content)
        assert requests_main(["verify", "--db", str(other)]) == 2
        assert capsys.readouterr().err.startswith(f"lightning-unlearn: error: {other} is not a ledger")
        assert other.read_bytes() == content
    with pytest.raises(ValueError, match="no ledger at"):
        Ledger(typo, create=False)
    Ledger(typo).close()  # the Python API (RecordLineage, sisa fit --sisa.ledger) creates one
    assert typo.is_file()


def test_huge_ids_end_in_one_line(db_url, tmp_path, capsys):
    with Ledger(db_url) as ledger:
        ledger.register_source("small", [f"{i:064x}" for i in range(100)], clients=[i % 4 for i in range(100)])
        ledger.record_version("small", "a" * 64, np.arange(100), checkpoint_path=str(tmp_path / "v1.pt"))
    huge = "99999999999999999999999"
    db = ["--db", db_url]
    for args, expected in (
        (["add", "--source", "small", "--sample-id", "3", huge, "--requester", "x"],
         f"unknown sample id(s) [{huge}] for data source 'small'; allowed ids are 0..99"),
        (["add", "--source", "small", "--client", huge, "--requester", "x"],
         f"unknown client(s) [{huge}] for data source 'small'"),
        (["lineage", "1", "--sample-id", huge], f"sample id(s) [{huge}] out of range; allowed ids are 0..99"),
        (["lineage", huge], f"unknown model version {huge}; allowed ids are 1..1"),
        (["show", huge], f"unknown request id(s) [{huge}]"),
        (["deploy", huge, "--by", "ops"], f"unknown model version {huge}; allowed ids are 1..1"),
    ):
        assert requests_main([*args, *db]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
