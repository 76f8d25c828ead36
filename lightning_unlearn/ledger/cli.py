"""``lightning-unlearn requests add | list | show | run | verify | export | lineage | deploy``.

The ledger is ``--db`` (a SQLite file path or a SQLAlchemy URL; default ``$LIGHTNING_UNLEARN_LEDGER``
or ``ledger.db``). It must exist: training with ``RecordLineage`` (or ``sisa fit --sisa.ledger``)
creates it, and no command here creates one, so a mistyped path fails instead of auditing an empty
ledger. Mistakes end with one line ``lightning-unlearn: error: ...`` and exit code 2; ``verify``
exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy.exc import SQLAlchemyError

from lightning_unlearn._io import atomic_write, dumps_json, to_jsonable
from lightning_unlearn.ledger.store import Ledger
from lightning_unlearn.request import ForgetRequest

PROG = "lightning-unlearn requests"
DEFAULT_DB = "ledger.db"
FORMATS = ("json", "csv")
CSV_FIELDS = ("id", "status", "kind", "targets", "num_samples", "requester", "received_at", "started_at",
              "finished_at", "job_id", "version_before", "version_after", "deployed_at", "method", "weights_sha256",
              "weights_path", "report_sha256", "report_path", "mask_sha256", "forget_acc", "remaining_acc",
              "test_acc", "mia_efficacy", "loss_auc", "error")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError, ImportError, SQLAlchemyError)


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2, like every lightning-unlearn command
        raise UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``requests`` subcommand; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.command is None:
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except (UsageError, *USER_ERRORS) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        line = next((ln.strip() for ln in str(message).splitlines() if ln.strip()), type(err).__name__)
        print(f"lightning-unlearn: error: {line}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--db", default=os.environ.get("LIGHTNING_UNLEARN_LEDGER", DEFAULT_DB),
                        help="ledger: SQLite file or SQLAlchemy URL (default: $LIGHTNING_UNLEARN_LEDGER or ledger.db)")
    parser = _Parser(prog=PROG, description="Deletion requests: record, serve in batches, verify, export.",
                     parents=[common])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("add", parents=[common], help="record a deletion request (validated now)")
    p.add_argument("--source", required=True, help="data source name (as recorded by RecordLineage)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--subject", nargs="+", help="data subject id(s) whose samples are to be deleted")
    what.add_argument("--sample-id", nargs="+", type=int, help="training-set index(es) to delete")
    what.add_argument("--client", nargs="+", type=int, help="federated client id(s) leaving")
    p.add_argument("--requester", required=True, help="who asked (a person, a client, an auditor)")
    p.add_argument("--note", default=None, help="free text, e.g. the ticket number")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("list", parents=[common], help="a table of requests")
    _filters(p)
    p.add_argument("--limit", type=int, default=50, help="newest N rows (0: all)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="one request with its job, versions and evidence")
    p.add_argument("request_id", type=int)
    p.add_argument("--json", action="store_true", help="print the auditor's JSON record instead")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("run", parents=[common], help="serve every pending request of a source in one job")
    p.add_argument("--config", required=True, help="LightningCLI YAML with model and data sections")
    p.add_argument("--source", default=None, help="data source (default: the only one in the ledger)")
    p.add_argument("--output-dir", default="outputs/requests", help="where job-<id>/ folders are written")
    p.add_argument("--version", type=int, default=None, help="model version to start from (default: the newest)")
    p.add_argument("--method", default=None, help="channel scoring method (default: the library's)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of channels to update")
    p.add_argument("--epochs", type=int, default=None, help="unlearning epochs")
    p.add_argument("--max-steps", type=int, default=None, help="cap on unlearning steps")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data batch size, or 64")
    p.add_argument("--takeover", action="store_true", help="finalise or discard jobs left running on another host")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", parents=[common], help="recompute hashes and check the evidence")
    p.add_argument("request_ids", type=int, nargs="*", help="default: every request")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export", parents=[common], help="an auditor's JSON or CSV for requests or a period")
    _filters(p)
    p.add_argument("--request", type=int, nargs="+", default=None, help="these request ids only")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the output file's extension")
    p.add_argument("--output", required=True, help="file to write (never overwritten)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lineage", parents=[common], help="did a model version ever see these samples?")
    p.add_argument("version_id", type=int)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--subject", nargs="+")
    what.add_argument("--sample-id", nargs="+", type=int)
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("deploy", parents=[common], help="record that a model version went into service")
    p.add_argument("version_id", type=int)
    p.add_argument("--by", required=True, help="who deployed it")
    p.set_defaults(func=cmd_deploy)
    return parser


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", default=None, help="received, running, done or failed")
    p.add_argument("--source", default=None)
    p.add_argument("--since", type=_time, default=None, help="received at or after (ISO date/time, UTC)")
    p.add_argument("--until", type=_time, default=None, help="received before (ISO date/time, UTC)")


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r} (e.g. 2025-01-31 or 2025-01-31T12:00)")
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# -- commands -----------------------------------------------------------------------------
def cmd_add(args) -> int:
    request = ForgetRequest(subjects=args.subject, sample_ids=args.sample_id, clients=args.client)
    with _open(args) as ledger:
        request_id = ledger.add_request(args.source, request, args.requester, args.note)
        row = ledger.request(request_id)
    print(f"request {request_id} received: {row['kind']} {_short(row['targets'])} -> "
          f"{len(row['sample_ids'])} sample(s) of {args.source!r}")
    return 0


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    with _open(args) as ledger:
        rows = ledger.requests(args.status, args.source, args.since, args.until)
        deployed = ledger.deployed_at([r["version_after_id"] for r in rows])
        names = {src.id: src.name for src in ledger.sources()}
    if args.limit:
        rows = rows[-args.limit:]
    several = len({r["source_id"] for r in rows}) > 1
    table = Table(title=f"deletion requests ({len(rows)} shown)")
    columns = ["id", "status", *(["source"] if several else []), "kind", "targets", "samples", "requester",
               "received", "versions", "deployed"]
    for col in columns:
        table.add_column(col, justify="right" if col in ("id", "samples") else "left", overflow="fold",
                         min_width=min(len(col), 8))
    for r in rows:
        status = r["status"] + (f": {r['error']}" if r["error"] else "")
        versions = f"{r['version_before_id'] or ''}->{r['version_after_id'] or ''}" if r["version_before_id"] else ""
        when = deployed.get(r["version_after_id"])
        table.add_row(str(r["id"]), status, *([names.get(r["source_id"], "?")] if several else []), r["kind"],
                      _short(r["targets"], 3), str(len(r["sample_ids"])), r["requester"], _fmt(r["received_at"], short=True),
                      versions, _fmt(when, short=True))
    Console().print(table)
    return 0


def cmd_show(args) -> int:
    with _open(args) as ledger:
        record = audit_records(ledger, ledger.requests(ids=[args.request_id]))[0]
    if args.json:
        print(dumps_json(record))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"request {args.request_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("status", "source", "kind", "targets", "requester", "note", "received_at", "started_at",
                "finished_at", "error", "job_id"):
        table.add_row(key, _short(record[key], 20) if isinstance(record[key], list) else _fmt(record[key]))
    table.add_row("samples", f"{len(record['sample_ids'])}: {_short(record['sample_ids'], 12)}")
    for key in ("version_before", "version_after"):
        v = record[key]
        table.add_row(key, f"{v['id']}  weights {v['weights_sha256'][:16]}  {v['checkpoint_path'] or ''}" if v else "")
    ev = record["evidence"]
    if ev:
        table.add_row("method", ev["method"])
        table.add_row("report", f"{ev['report_path']}  sha256 {ev['report_sha256'][:16]}")
        table.add_row("mask", f"{ev['mask_path'] or ''}  sha256 {(ev['mask_sha256'] or '')[:16]}")
        for model, values in ev["attacks"].items():
            table.add_row(f"attacks ({model})", ", ".join(f"{k}={_num(v)}" for k, v in values.items()))
        unl = ev["metrics"].get("unlearned", {})
        table.add_row("accuracy (unlearned)", ", ".join(f"{k}={_num(unl.get(k))}"
                                                        for k in ("forget_acc", "remaining_acc", "test_acc")))
    table.add_row("deployed", _fmt(record["deployed_at"]))
    Console().print(table)
    return 0


def cmd_run(args) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from lightning_unlearn.ledger.runner import run_pending

    with _open(args) as ledger:  # the ledger first: a mistyped --db fails before the model and data load
        source = args.source or _only_source(ledger)
        model, train, test, batch_size, seed = load_config(args.config)
        kwargs = {k: v for k, v in (("method", args.method), ("ratio", args.ratio), ("epochs", args.epochs),
                                    ("max_steps", args.max_steps)) if v is not None}
        console = Console(stderr=True)
        import lightning.pytorch as pl

        pl.seed_everything(seed, verbose=False)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=False) as bar:
            task = bar.add_task("starting", total=None)

            def progress(message: str) -> None:
                bar.update(task, description=message)
                bar.console.log(message)

            outcome = run_pending(ledger, source, model, train, test, args.output_dir, args.version, kwargs,
                                  batch_size=args.batch_size or batch_size, takeover=args.takeover, progress=progress)
            bar.update(task, description=f"{outcome.status}")
    for job_id, action in outcome.recovered:
        print(f"job {job_id[:12]}: {action}")
    if outcome.status == "idle":
        print("no pending requests")
    elif outcome.status == "unchanged":
        print(f"requests {list(outcome.request_ids)} done: model version {outcome.version_id} never held their samples")
    else:
        print(f"requests {list(outcome.request_ids)} done in job {outcome.job_id[:12]}: model version "
              f"{outcome.version_id}, report {outcome.report_path}")
    return 0


def cmd_verify(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from lightning_unlearn.ledger.verify import verify

    with _open(args) as ledger:
        checks = verify(ledger, args.request_ids or None)
    table = Table(title="verification")
    for col in ("requests", "job", "check", "result", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(",".join(map(str, c.request_ids)), (c.job_id or "")[:12], c.name,
                      "[green]ok[/green]" if c.ok else "[red]FAILED[/red]", c.detail)
    Console().print(table)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; FAILED: {failed[0].name}" if failed else ""))
    return 1 if failed else 0


def cmd_export(args) -> int:
    out = Path(args.output)
    fmt = args.format or out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed formats are {list(FORMATS)} (use --format)")
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite it")
    with _open(args) as ledger:
        rows = ledger.requests(args.status, args.source, args.since, args.until, ids=args.request)
        records = audit_records(ledger, rows)
        url = ledger.engine.url.render_as_string(hide_password=True)
    if fmt == "json":
        payload = _json_ready({"exported_at": datetime.now(timezone.utc), "ledger": url,
                               "filter": {k: getattr(args, k) for k in ("status", "source", "since", "until", "request")},
                               "requests": records})
        text = dumps_json(payload)
    else:
        text = to_csv(records)
    atomic_write(out, lambda f: f.write(text.encode()), overwrite=False)
    print(f"wrote {len(records)} request(s) to {out}")
    return 0


def cmd_lineage(args) -> int:
    import numpy as np

    with _open(args) as ledger:
        version = ledger.version(args.version_id)
        if args.subject:
            ids = ledger.resolve(ForgetRequest(subjects=args.subject), version["source"]).sample_ids
        else:
            ids = args.sample_id
        state = ledger.lineage(args.version_id, ids)
    ids = np.arange(len(state)) if ids is None else np.asarray(ids)
    names = {0: "never seen", 1: "trained into the weights", 2: "trained, then unlearned"}
    print(f"model version {args.version_id} (source {version['source']!r}, weights {version['weights_sha256'][:16]}):")
    for code, name in names.items():
        picked = ids[state == code]
        if len(picked):
            print(f"  {name}: {len(picked)} sample(s) {_short(picked.tolist(), 10)}")
    return 0


def cmd_deploy(args) -> int:
    with _open(args) as ledger:
        ledger.deploy(args.version_id, args.by)
    print(f"model version {args.version_id} recorded as deployed by {args.by}")
    return 0


# -- helpers ------------------------------------------------------------------------------
def _open(args) -> Ledger:
    """The existing ledger ``--db`` names (never a new one)."""
    return Ledger(args.db, create=False)


def load_config(path: str) -> tuple[Any, Any, Any, int, int]:
    """Model and data from a LightningCLI YAML (its ``model`` and ``data`` sections), plus batch size and seed."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule, LightningModule

    from lightning_unlearn.data.presets import datasets_of

    config_path = Path(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} does not exist")
    raw = yaml.safe_load(config_path.read_text()) or {}
    missing = [k for k in ("model", "data") if k not in raw]
    if missing:
        raise ValueError(f"config {config_path} has no {' or '.join(missing)} section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.instantiate_classes(parser.parse_object({"model": raw["model"], "data": raw["data"]}))
    model, data = cfg.model, cfg.data
    train, test = datasets_of(data)
    seed = raw.get("seed_everything")
    return model, train, test, int(getattr(data, "batch_size", 64) or 64), int(seed) if isinstance(seed, int) else 0


def audit_records(ledger: Ledger, rows: list[dict]) -> list[dict]:
    """Each request with its job, versions before and after, evidence (without the report text) and deployment."""
    names = {src.id: src.name for src in ledger.sources()}
    versions: dict[int, dict] = {}

    def version(vid):
        if vid is None:
            return None
        if vid not in versions:
            v = ledger.version(vid)
            versions[vid] = {k: v[k] for k in ("id", "parent_id", "weights_sha256", "checkpoint_path", "num_trained",
                                               "samples_sha256", "created_at")}
        return versions[vid]

    deployed = ledger.deployed_at([r["version_after_id"] for r in rows])
    evidence: dict[str, dict | None] = {}
    out = []
    for r in rows:
        job = r["job_id"]
        if job and job not in evidence:
            ev = ledger.evidence(job)
            evidence[job] = {k: v for k, v in ev.items() if k != "report_json"} if ev else None
        out.append({**{k: v for k, v in r.items() if k not in ("source_id", "version_before_id", "version_after_id")},
                    "source": names.get(r["source_id"]), "version_before": version(r["version_before_id"]),
                    "version_after": version(r["version_after_id"]), "evidence": evidence.get(job) if job else None,
                    "deployed_at": deployed.get(r["version_after_id"])})
    return _json_ready(out)


def _json_ready(value: Any) -> Any:
    """JSON values, with times as ISO 8601 strings (UTC)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return to_jsonable(value)


def to_csv(records: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in records:
        ev = r.get("evidence") or {}
        unlearned = (ev.get("metrics") or {}).get("unlearned", {})
        attacks = (ev.get("attacks") or {}).get("unlearned", {})
        writer.writerow({
            **{k: r.get(k) for k in ("id", "status", "kind", "requester", "received_at", "started_at", "finished_at",
                                     "job_id", "deployed_at", "error")},
            "targets": " ".join(map(str, r["targets"])), "num_samples": len(r["sample_ids"]),
            "version_before": (r.get("version_before") or {}).get("id"),
            "version_after": (r.get("version_after") or {}).get("id"),
            **{k: ev.get(k) for k in ("method", "weights_sha256", "weights_path", "report_sha256", "report_path",
                                      "mask_sha256")},
            **{k: unlearned.get(k) for k in ("forget_acc", "remaining_acc", "test_acc")},
            **{k: attacks.get(k) for k in ("mia_efficacy", "loss_auc")},
        })
    return buffer.getvalue()


def _only_source(ledger: Ledger) -> str:
    names = [src.name for src in ledger.sources()]
    if len(names) != 1:
        raise ValueError(f"the ledger has data sources {names or 'none'}; name one with --source")
    return names[0]


def _short(values: Any, n: int = 5) -> str:
    if not isinstance(values, (list, tuple)):
        return str(values)
    text = ", ".join(map(str, values[:n]))
    return text + (f", ... ({len(values)})" if len(values) > n else "")


def _fmt(value: Any, short: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")
    if isinstance(value, str) and len(value) > 19 and value[10] == "T":
        return value[:19].replace("T", " ")
    return str(value)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
