"""Serve every pending request of a data source in one unlearning job, safely against crashes.

A job moves its requests ``received -> running -> done`` (or ``failed``). Its outputs go to a
fresh folder ``job-<id>/``; the ledger rows (new model version, evidence, requests done) land
in one transaction after the weights and report are on disk. A process killed at any point
leaves either a running job whose outputs are complete (the next run finalises it from disk)
or one whose outputs are not (the next run deletes them and serves the requests again).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import Dataset, Subset

from lightning_unlearn._system import pid_alive
from lightning_unlearn._io import load_torch_file, to_jsonable
from lightning_unlearn.api import unlearn
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence.evaluate import write_report
from lightning_unlearn.evidence.report import weights_sha256
from lightning_unlearn.ledger.identity import sample_hashes
from lightning_unlearn.ledger.store import Job, Ledger, Source
from lightning_unlearn.request import ForgetRequest

log = logging.getLogger(__name__)

ATTACK_KEYS = ("mia_efficacy", "mia_shadow_acc", "mia_informative", "loss_auc", "probe_forget_acc", "backdoor_asr")
DEFAULT_EVALUATION = {"relearn": False, "max_samples": 1000}


@dataclass
class RunOutcome:
    """What one ``run`` did: ``status`` is ``"done"``, ``"unchanged"`` (no held sample to forget) or ``"idle"``."""

    status: str
    job_id: str | None = None
    request_ids: tuple[int, ...] = ()
    version_id: int | None = None
    report_path: Path | None = None
    recovered: list[tuple[str, str]] = field(default_factory=list)  # (job id, "finalised" | "abandoned")


def check_same_data(source: Source, train_dataset: Dataset) -> None:
    """The data to unlearn from must be the data the ledger recorded (same content hashes)."""
    hashes = sample_hashes(train_dataset)
    import hashlib

    digest = hashlib.sha256("".join(hashes).encode()).hexdigest()
    if len(hashes) != source.num_samples or digest != source.content_sha256:
        raise ValueError(f"the training data ({len(hashes)} samples, hash {digest[:12]}...) is not data source "
                         f"{source.name!r} of the ledger ({source.num_samples} samples, hash {source.content_sha256[:12]}...)")


def recover(ledger: Ledger, source: Source, takeover: bool = False, progress: Callable[[str], None] | None = None
            ) -> list[tuple[str, str]]:
    """Finalise or abandon the running jobs of ``source`` left by processes that died.

    A job of a live process on this host is never touched; a job from another host only with
    ``takeover=True``.
    """
    done = []
    for row in ledger.jobs(status="running", source=source):
        if row["host"] == socket.gethostname() and row["pid"] != os.getpid() and pid_alive(row["pid"]):
            raise ValueError(f"job {row['id']} is still running in process {row['pid']} on this host; "
                             "wait for it to finish")
        if row["host"] != socket.gethostname() and not takeover:
            raise ValueError(f"job {row['id']} is marked running on host {row['host']!r}; if that process is gone, "
                             "rerun with takeover")
        job = ledger.job(row["id"])
        report_path = _complete_report(ledger, job)
        if report_path is not None:
            _notify(progress, f"finalising job {job.id[:12]} from its outputs on disk")
            _finalise(ledger, job, report_path)
            done.append((job.id, "finalised"))
        else:
            _notify(progress, f"discarding the partial outputs of job {job.id[:12]}")
            if job.output_dir.name.startswith("job-") and job.output_dir.is_dir():
                shutil.rmtree(job.output_dir)
            ledger.abandon_job(job.id, "the process running it stopped before its outputs were complete")
            done.append((job.id, "abandoned"))
    return done


def run_pending(
    ledger: Ledger,
    source: Source | str,
    model: pl.LightningModule,
    train_dataset: Dataset,
    test_dataset: Dataset,
    output_root: str | os.PathLike,
    version_id: int | None = None,
    unlearn_kwargs: Mapping[str, Any] | None = None,
    evaluate_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    takeover: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Recover dead jobs, then serve every received request of ``source`` in one unlearning job.

    The forget set is the union of the requests' samples that the model version still holds
    (lineage); the retain set is the rest of what it holds (samples unlearned earlier stay out).
    ``unlearn_kwargs`` go to :func:`lightning_unlearn.unlearn`, ``evaluate_kwargs`` to the report's
    evaluation (default: no relearn-time measurement, at most 1000 samples per split).
    """
    source = source if isinstance(source, Source) else ledger.source(source)
    _notify(progress, "checking the training data against the ledger")
    check_same_data(source, train_dataset)
    recovered = recover(ledger, source, takeover, progress)
    job = ledger.start_job(source, output_root, version_id)
    if job is None:
        return RunOutcome("idle", recovered=recovered)
    _notify(progress, f"job {job.id[:12]}: {len(job.request_ids)} request(s), {len(job.forget_ids)} sample(s), "
                      f"on model version {job.version_id}")
    try:
        held = ledger.held(job.version_id)
        forget = np.intersect1d(job.forget_ids, held)
        if not len(forget):
            reason = f"model version {job.version_id} holds none of the requested samples: nothing to unlearn"
            ledger.close_without_change(job, reason)
            _notify(progress, reason)
            return RunOutcome("unchanged", job.id, job.request_ids, job.version_id, recovered=recovered)
        if len(forget) == len(held):
            raise ValueError(f"the requests cover all {len(held)} samples model version {job.version_id} holds: "
                             "nothing would be retained")
        original = _load_version(ledger, job.version_id, model)
        positions = np.searchsorted(held, forget)
        dm = UnlearningDataModule(Subset(train_dataset, held.tolist()), test_dataset,
                                  ForgetRequest(sample_ids=forget.tolist()), batch_size=batch_size,
                                  forget_indices=positions)
        _notify(progress, f"unlearning {len(forget)} sample(s) from model version {job.version_id}")
        result = unlearn(copy.deepcopy(original), dm, **dict(unlearn_kwargs or {}))
        _notify(progress, "evaluating and writing the weights and the report")
        config = getattr(result, "config", None)
        params = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(unlearn_kwargs or {})
        params["ledger"] = {"job": job.id, "requests": list(job.request_ids), "version_before": job.version_id}
        _, report_path = write_report(
            job.output_dir, original, result, dm, method=str(getattr(result, "method", "unlearn")),
            params=to_jsonable(params), seed=int(params.get("seed", 0) or 0), plots=False, on_exists="error",
            **{**DEFAULT_EVALUATION, **dict(evaluate_kwargs or {})})
    except BaseException as err:  # a failure (not a kill) is final and recorded with its reason
        if not isinstance(err, KeyboardInterrupt):
            ledger.fail_job(job, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip())
        raise
    _notify(progress, "recording the new model version and the evidence")
    version = _finalise(ledger, job, report_path)
    return RunOutcome("done", job.id, job.request_ids, version, report_path, recovered)


def _load_version(ledger: Ledger, version_id: int, model: pl.LightningModule) -> pl.LightningModule:
    """``model`` with the weights of ``version_id``, after checking they are the ones the ledger names."""
    version = ledger.version(version_id)
    path = version["checkpoint_path"]
    if not path:
        raise ValueError(f"model version {version_id} has no checkpoint path: its weights cannot be loaded")
    state = load_torch_file(path, "checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    digest = weights_sha256(state)
    if digest != version["weights_sha256"]:
        raise ValueError(f"checkpoint {path} hashes to {digest[:12]}..., the ledger names {version['weights_sha256'][:12]}... "
                         f"for model version {version_id}: the file changed")
    model.load_state_dict(state)
    return model.eval()


def _complete_report(ledger: Ledger, job: Job) -> Path | None:
    """The job's report if the job's outputs are complete and consistent on disk, else None."""
    reports = sorted(job.output_dir.glob("*.report.json")) if job.output_dir.is_dir() else []
    if len(reports) != 1:
        return None
    try:
        report = json.loads(reports[0].read_text())
        weights = Path(report["checkpoint"])
        parent = ledger.version(job.version_id)
        ok = (weights.is_file() and weights.parent == job.output_dir
              and weights_sha256(load_torch_file(weights, "weights")) == report["unlearned_sha256"]
              and report["original_sha256"] == parent["weights_sha256"]
              and report.get("params", {}).get("ledger", {}).get("job") == job.id)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return reports[0] if ok else None


def _finalise(ledger: Ledger, job: Job, report_path: Path) -> int:
    """The one transaction that makes a job's outputs official (from what is on disk, not from memory)."""
    text = report_path.read_text()
    report = json.loads(text)
    weights = Path(report["checkpoint"])
    held = ledger.held(job.version_id)
    forget = np.intersect1d(job.forget_ids, held)
    metrics = report.get("metrics", {})
    attacks = {model: {k: m[k] for k in ATTACK_KEYS if k in m} for model, m in metrics.items() if isinstance(m, dict)}
    mask = report.get("mask") or {}
    return ledger.finish_job(
        job, weights_sha256=weights_sha256(load_torch_file(weights, "weights")), weights_path=weights,
        report_path=report_path, report_text=text, method=report.get("method", ""),
        metrics={**metrics, "comparison": report.get("comparison", {}), "timings_s": report.get("timings_s", {})},
        attacks=attacks, mask_path=report.get("mask_file"), mask_sha256=mask.get("sha256"),
        trained_ids=np.setdiff1d(held, forget))




def _notify(progress: Callable[[str], None] | None, message: str) -> None:
    log.info("ledger run: %s", message)
    if progress is not None:
        progress(message)
