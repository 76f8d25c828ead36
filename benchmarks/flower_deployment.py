"""Flower deployment on one host: start-up, `flwr run` wall time and per-round orchestration overhead.

A SuperLink and ``--clients`` SuperNodes as real processes on 127.0.0.1 (each node reading its
own shard file), the library's example App run with ``flwr run``, ``--repeats`` runs on the same
deployment. Modes (``--modes``): ``warm`` = warm executors (tasks forked from a pre-imported
process) + SuperNode poll capped at 0.1 s + server polling every 0.05 s (the defaults of
``LocalDeployment``); ``warm-stock-poll`` = warm executors but Flower's 3 s SuperNode poll.
Start-up ends when every warm executor has imported torch and polls for tasks. Per round (the
FedAvg and masked rounds): wall time, the clients' summed local compute (``local_compute_s``) and
the difference; "ServerApp s" is the ServerApp's own run (``timings_s.total``), the rest of
``flwr run`` is Flower's (packaging the app, starting the run and its ServerApp task, streaming
logs). ``--reset`` pins ``UnlearnConfig.reset`` (``none``: no statistics round). Writes ``flower_deployment.json`` and ``flower_deployment.md`` under ``--out``.

    python benchmarks/flower_deployment.py --repeats 2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_unlearn._io import write_json
from lightning_unlearn.federated import FederatedPartitions
from lightning_unlearn.federated.partitions import save_partition

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
sys.path.insert(0, str(APP.parents[1] / "tests" / "flower_support"))  # the tests' start-up speed-ups (Flower internals)
from local_deployment import LocalDeployment  # noqa: E402
MODES = {"warm": {"warm": True, "poll_interval": 0.1}, "warm-stock-poll": {"warm": True, "poll_interval": None}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--train-rounds", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--unlearn-rounds", type=int, default=1)
    p.add_argument("--unlearn-steps", type=int, default=5)
    p.add_argument("--reset", default="none", help="UnlearnConfig.reset for the run (pinned: the default is in flux)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default="warm", help=f"comma-separated: {', '.join(MODES)}")
    return p.parse_args(argv)


def one_mode(args, mode: str, paths: list[Path], work: Path) -> dict:
    dep = LocalDeployment([{"data-path": str(p)} for p in paths], work / mode, **MODES[mode])
    t0 = time.perf_counter()
    runs = []
    try:
        dep.start()
        start_s = time.perf_counter() - t0
        for i in range(args.repeats):
            out = work / mode / f"out{i}"
            t1 = time.perf_counter()
            res = dep.flwr_run(APP, {"train-rounds": args.train_rounds, "local-steps": args.local_steps,
                                     "unlearn-rounds": args.unlearn_rounds, "unlearn-steps": args.unlearn_steps,
                                     "num-clients": args.clients, "output-dir": str(out), "reset": args.reset}, timeout=1800)
            wall = time.perf_counter() - t1
            if res.returncode != 0:
                raise RuntimeError(f"flwr run failed: {res.stdout[-2000:]} {res.stderr[-2000:]}")
            report = json.loads(next(out.glob("run-*/report.json")).read_text())
            rows = report["extra"]["training"] + report["extra"]["unlearning"]
            runs.append({"flwr_run_s": wall, "server_timings_s": report["timings_s"], "rows": rows,
                         "mask_sha256": report["mask"]["sha256"],
                         "forget_acc": report["metrics"]["unlearned"].get("forget_acc")})
    finally:
        dep.stop()
    rows = [r for run in runs for r in run["rows"]]
    return {"mode": mode, "start_s": start_s, "runs": runs,
            "round_s": float(np.mean([r["round_s"] for r in rows])),
            "local_compute_s": float(np.mean([r["local_compute_s"] for r in rows])),
            "overhead_s": float(np.mean([r["round_s"] - r["local_compute_s"] for r in rows])),
            "flwr_run_s": float(np.mean([r["flwr_run_s"] for r in runs])),
            "server_total_s": float(np.mean([r["server_timings_s"]["total"] for r in runs])),
            "messages_per_run": len(runs[0]["rows"])}


def table(results: list[dict]) -> list[str]:
    """One row per mode."""
    lines = ["| mode | start-up s | `flwr run` s | ServerApp s | round s | local compute s (sum over clients) | "
             "round - compute s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        runs = ", ".join(f"{x['flwr_run_s']:.1f}" for x in r["runs"])
        lines.append(f"| {r['mode']} | {r['start_s']:.1f} | {r['flwr_run_s']:.1f} ({runs}) | {r['server_total_s']:.1f} | "
                     f"{r['round_s']:.2f} | {r['local_compute_s']:.2f} | {r['overhead_s']:.2f} |")
    return lines


def render_page(results: Path) -> str:
    """docs/benchmarks/flower_deployment.md from flower_deployment.json."""
    import pagekit

    rec = pagekit.load(results, "flower_deployment.json")
    c, h = rec["config"], rec["host"]
    intro = (f"A real deployment: one SuperLink and {c['clients']} SuperNodes as separate processes on 127.0.0.1, each "
             "node reading its own digits shard file; the library's example App run with `flwr run` "
             f"({c['train_rounds']} FedAvg round(s) of {c['local_steps']} local steps, the scoring round, "
             f"{c['unlearn_rounds']} masked round(s) of {c['unlearn_steps']} steps, `reset={c['reset']}` pinned). Each "
             f"mode ran {c['repeats']} times on the same deployment. `warm`: warm executors (torch imported once, "
             "tasks forked from a pre-imported process), SuperNode poll capped at 0.1 s, server polling every 0.05 s "
             "(the defaults of `LocalDeployment`); `warm-stock-poll`: the same executors with Flower's 3 s SuperNode "
             "poll. Start-up ends when every executor polls for tasks. ServerApp s is the ServerApp's own run; the "
             "rest of `flwr run` is Flower's (packaging, starting the run, streaming logs).")
    machine = (pagekit.machine(rec) + f"; load average {' '.join(h['loadavg_before'])} before, "
               f"{' '.join(h['loadavg_after'])} after (other jobs running)")
    lines = pagekit.header("Flower deployment on one host", "flower_deployment.py", ["flower_deployment.json"],
                           [f"python benchmarks/flower_deployment.py --repeats {c['repeats']} --modes {c['modes']} "
                            f"--reset {c['reset']}"], [machine], intro)
    return pagekit.finish(lines + table(rec["results"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="flower-deployment-") as tmp:
        work = Path(tmp)
        fdm = FederatedPartitions("digits", args.clients, "iid", seed=0, batch_size=32).datamodule()
        paths = [save_partition(fdm, k, work / f"site{k}" / f"client{k}.pt") for k in range(args.clients)]
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[:3]
        results = [one_mode(args, m, paths, work) for m in args.modes.split(",")]
        with open("/proc/loadavg") as f:
            load_after = f.read().split()[:3]
    record = {"config": vars(args), "host": {"cpus": __import__("os").cpu_count(), "machine": platform.machine(),
                                            "loadavg_before": load_before, "loadavg_after": load_after},
              "results": results}
    write_json(record, out / "flower_deployment.json")
    lines = table(results)
    (out / "flower_deployment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
