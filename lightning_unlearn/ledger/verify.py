"""An auditor's re-check, from the ledger alone: the files on disk are the ones it names, and the evidence fits them."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_unlearn.evidence.report import weights_sha256
from lightning_unlearn.ledger.store import Ledger
from lightning_unlearn.mask import ParameterMask


@dataclass(frozen=True)
class Verification:
    """One verified statement about one request's job."""

    request_ids: tuple[int, ...]
    job_id: str | None
    name: str
    ok: bool
    detail: str = ""


def verify(ledger: Ledger, request_ids: Sequence[int] | None = None) -> list[Verification]:
    """Recompute hashes and compare the evidence for finished requests (all of them by default).

    Per job: the weights file hashes to the version the ledger names; the report file's bytes
    hash to the recorded hash and equal the stored report; the report names those weights, the
    parent version's weights and the job's forget set; the mask file is the mask in the report;
    the lineage marks the forgotten samples as unlearned. Requests closed without a new model:
    the lineage shows the version never held their samples. Every done request: no model version
    recorded after it holds its samples again (e.g. one trained from an older version's weights).
    """
    rows = ledger.requests(ids=request_ids) if request_ids is not None else ledger.requests()
    checks: list[Verification] = []
    by_job: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] != "done":
            checks.append(Verification((row["id"],), row["job_id"], "status", row["status"] != "failed" or bool(row["error"]),
                                f"{row['status']}: nothing to verify yet" if row["status"] != "failed"
                                else f"failed: {row['error']}"))
            continue
        by_job.setdefault(row["job_id"], []).append(row)
    for job_id, reqs in by_job.items():
        ids = tuple(r["id"] for r in reqs)
        evidence = ledger.evidence(job_id)
        if evidence is None:
            checks += _unchanged(ledger, ids, job_id, reqs)
        else:
            checks += _job_checks(ledger, ids, job_id, reqs, evidence)
    done = [r for reqs in by_job.values() for r in reqs]
    checks += _kept_by_later_versions(ledger, sorted(done, key=lambda r: r["id"]))
    return checks


def _kept_by_later_versions(ledger: Ledger, done: list[dict]) -> list[Verification]:
    """A deletion reported done stays done: no version recorded after it holds the request's samples."""
    versions: dict[int, list[int]] = {}  # source id -> its version ids
    states: dict[int, np.ndarray] = {}  # version id -> lineage of every sample
    out = []
    for r in done:
        if r["source_id"] not in versions:
            versions[r["source_id"]] = [v["id"] for v in ledger.versions() if v["source_id"] == r["source_id"]]
        later = [v for v in versions[r["source_id"]] if v > r["version_after_id"]]
        ids = np.asarray(r["sample_ids"], dtype=np.int64)
        holding = []
        for v in later:
            if v not in states:
                states[v] = ledger.lineage(v)
            back = int((states[v][ids] == 1).sum()) if len(ids) else 0
            if back:
                holding.append(f"version {v} holds {back} of its {len(ids)} sample(s)")
        out.append(Verification((r["id"],), r["job_id"], "later versions keep the deletion", not holding,
                         "; ".join(holding) if holding else f"{len(later)} later version(s) hold none of its samples"))
    return out


def _unchanged(ledger: Ledger, ids, job_id, reqs) -> list[Verification]:
    out = []
    for r in reqs:
        state = ledger.lineage(r["version_after_id"], r["sample_ids"])
        held = np.asarray(r["sample_ids"])[state == 1]
        out.append(Verification((r["id"],), job_id, "lineage: version never held the samples", not len(held),
                         f"version {r['version_after_id']} holds sample(s) {held[:10].tolist()}" if len(held) else
                         f"version {r['version_after_id']} holds none of {len(r['sample_ids'])} sample(s)"))
    return out


def _job_checks(ledger: Ledger, ids, job_id, reqs, ev: dict) -> list[Verification]:
    out: list[Verification] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        out.append(Verification(ids, job_id, name, bool(ok), detail))
        return bool(ok)

    version = ledger.version(ev["version_id"])
    parent = ledger.version(version["parent_id"])
    check("requests point at the new version", all(r["version_after_id"] == version["id"] for r in reqs),
          f"version {version['id']}")
    weights = Path(ev["weights_path"])
    if check("weights file exists", weights.is_file(), str(weights)):
        try:
            digest = weights_sha256(weights)
        except Exception as err:  # noqa: BLE001 - an unreadable file is a failed check, not a crash
            digest = f"unreadable ({type(err).__name__})"
        check("weights hash = ledger version", digest == version["weights_sha256"] == ev["weights_sha256"],
              f"file {digest[:16]}, ledger {version['weights_sha256'][:16]}")
    report_path = Path(ev["report_path"])
    if not check("report file exists", report_path.is_file(), str(report_path)):
        return out
    data = report_path.read_bytes()
    check("report hash = ledger evidence", hashlib.sha256(data).hexdigest() == ev["report_sha256"],
          f"file {hashlib.sha256(data).hexdigest()[:16]}, ledger {ev['report_sha256'][:16]}")
    check("report = stored copy", data.decode(errors="replace") == ev["report_json"])
    try:
        report = json.loads(data)
    except ValueError as err:
        check("report is JSON", False, str(err))
        return out
    check("report names the new weights", report.get("unlearned_sha256") == version["weights_sha256"]
          and Path(str(report.get("checkpoint"))) == weights)
    check("report names the parent weights", report.get("original_sha256") == parent["weights_sha256"],
          f"parent version {parent['id']}")
    forget = np.intersect1d(np.unique(np.concatenate([np.asarray(r["sample_ids"], dtype=np.int64) for r in reqs])),
                            ledger.held(parent["id"]))
    asked = sorted(report.get("request", {}).get("sample_ids", []))
    check("report's forget set = the requests' held samples", asked == forget.tolist(),
          f"{len(asked)} in the report, {len(forget)} from the ledger")
    if ev["mask_path"]:
        mask_file = Path(ev["mask_path"])
        if check("mask file exists", mask_file.is_file(), str(mask_file)):
            try:
                digest = ParameterMask.load(mask_file).sha256()
            except Exception as err:  # noqa: BLE001
                digest = f"unreadable ({type(err).__name__})"
            check("mask hash = evidence = report", digest == ev["mask_sha256"] == (report.get("mask") or {}).get("sha256"),
                  f"file {digest[:16]}")
    state = ledger.lineage(version["id"], forget)
    check("lineage: forgotten samples marked unlearned", bool((state == 2).all()),
          f"{int((state == 2).sum())}/{len(forget)} marked unlearned")
    return out
