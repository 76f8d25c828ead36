"""SISA behind the request ledger: exact deletions recorded as model versions with evidence (method ``sisa``).

``record_fit`` records a trained SISA run's ensemble as a model version; ``serve_requests``
claims the ledger's pending requests, deletes them exactly and records the new version, the
report (``"exact": true``) and the lineage, so ``lightning-unlearn requests verify`` checks SISA
jobs like any other.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_unlearn._io import write_json
from lightning_unlearn.exact.sisa import SISA
from lightning_unlearn.request import ForgetRequest


def _weights(run: SISA, path: Path) -> tuple[Path, str]:
    """The ensemble's state dict as a weights file, and its hash as the ledger computes it."""
    from lightning_unlearn.evidence.report import save_weights, weights_sha256

    ensemble = run.ensemble()
    written = save_weights(ensemble, path, on_exists="error")
    return written, weights_sha256(ensemble)


def record_fit(run: SISA, ledger, source, weights_path: str | os.PathLike) -> int:
    """Record the run's current ensemble as a model version holding every sample not deleted; returns its id."""
    path, digest = _weights(run, Path(weights_path))
    return ledger.record_version(source, digest, run.held_ids(), checkpoint_path=path, kind="fit",
                                 details={"method": "sisa", "exact": True, "sisa_dir": str(run.root),
                                          "config": run.config.to_dict()})


def serve_requests(run: SISA, ledger, source, test_dataset: Dataset | None,
                   output_root: str | os.PathLike) -> dict[str, Any]:
    """Serve every pending request of ``source`` with one exact SISA deletion.

    The ledger's head version must be this run's current ensemble (same weights hash). The run's
    locks are held from claiming the requests to recording the new version, so two servers on one
    run take turns (the second claims on the version the first recorded).
    Returns ``{"status": "idle" | "unchanged" | "done", ...}``.
    """
    with run.lock():
        return _serve(run, ledger, source, test_dataset, output_root)


def _serve(run: SISA, ledger, source, test_dataset: Dataset | None, output_root: str | os.PathLike) -> dict[str, Any]:
    from lightning_unlearn.evidence.report import weights_sha256

    job = ledger.start_job(source, output_root)
    if job is None:
        return {"status": "idle"}
    try:
        parent = ledger.version(job.version_id)
        current = weights_sha256(run.ensemble())
        if parent["weights_sha256"] != current:
            raise ValueError(f"ledger version {job.version_id} is not the current ensemble of the SISA run in "
                             f"{run.root} (weights {parent['weights_sha256'][:12]}... vs {current[:12]}...)")
        forget = np.intersect1d(job.forget_ids, ledger.held(job.version_id))
        if not len(forget):
            reason = f"model version {job.version_id} holds none of the requested samples: nothing to delete"
            ledger.close_without_change(job, reason)
            return {"status": "unchanged", "job": job.id, "reason": reason}
        job.output_dir.mkdir(parents=True, exist_ok=True)
        result = run.forget(ForgetRequest(sample_ids=forget.tolist()), test_dataset, report_dir=job.output_dir)
        weights, digest = _weights(run, job.output_dir / "ensemble-weights.pt")
        report = {**result.to_dict(), "checkpoint": str(weights), "unlearned_sha256": digest,
                  "original_sha256": parent["weights_sha256"], "sisa_dir": str(run.root),
                  "ledger": {"job": job.id, "requests": list(job.request_ids), "version_before": job.version_id}}
        report_path = write_json(report, job.output_dir / "report.json", overwrite=False)
        text = report_path.read_text()
    except BaseException as err:  # a failure (not a kill) is final and recorded with its reason
        if not isinstance(err, KeyboardInterrupt):
            ledger.fail_job(job, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip())
        raise
    version = ledger.finish_job(job, weights_sha256=digest, weights_path=weights, report_path=report_path,
                                report_text=text, method="sisa", metrics={**result.metrics, "exact": True},
                                attacks={}, trained_ids=run.held_ids())
    return {"status": "done", "job": job.id, "version": version, "report": report_path,
            "affected_shards": sorted(result.affected), "seconds": result.seconds}

