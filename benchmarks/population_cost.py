"""What a population cell costs before it is run: one training epoch timed, scaled to the cell's populations.

A cell trains K originals, then per request K retrained models with the original's schedule and K each with half
and with double it (``population.run_cell``): K x (1 + 3.5 x requests) trainings of the original's schedule, each
timed here as the plain retraining loop the harness compares with (``population.train_plain``), on the full
training set (a retain set is at most 10% smaller). The estimate leaves out the methods, the relearn probes and the
evaluation, which are small next to it. The population page lists the cells without results and, where this
script measured them, what they would cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population_cost.py --datasets digits mnist --archs ResNet18
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import population  # noqa: E402

from lightning_unlearn._io import write_json  # noqa: E402

SCHEDULES = 1 + 0.5 + 2  # retrained, half- and double-schedule populations per request


def cost_path(dataset: str, arch: str, results: Path = population.RESULTS) -> Path:
    return results / f"population_cost_{dataset}_{arch}.json"


def measure(dataset: str, arch: str, args) -> dict[str, Any]:
    """CPU seconds of ``args.batches`` batches of the plain loop (all of one epoch when 0), scaled to the cell."""
    spec = population.DATASETS[dataset]
    train, _ = population.load(dataset, args)
    n = len(train) if args.batches == 0 else min(len(train), args.batches * spec.batch_size)
    model = population.ARCHS[arch](num_classes=10, image_size=spec.image_size, epochs=spec.epochs)
    t0, c0 = time.perf_counter(), time.process_time()
    population.train_plain(model, Subset(train, list(range(n))), 1, spec.batch_size, seed=0)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    epoch_s = cpu * len(train) / n
    training_s = epoch_s * spec.epochs
    requests = len(population.REQUESTS)
    return {"dataset": dataset, "architecture": arch, "num_train": len(train), "samples_timed": n,
            "timed_cpu_s": cpu, "timed_wall_s": wall, "epoch_cpu_s": epoch_s, "epochs": spec.epochs,
            "training_cpu_s": training_s, "k": args.k, "requests": requests,
            "cell_trainings": args.k * (1 + SCHEDULES * requests),
            "cell_cpu_s": training_s * args.k * (1 + SCHEDULES * requests),
            "one_request_cpu_s": training_s * args.k * (1 + SCHEDULES)}


def section(results: Path, present: set[tuple[str, str]]) -> list[str]:
    """The page's paragraph on the dataset/architecture cells without results, with their measured cost if any."""
    missing = [(d, a) for d in population.DATASETS for a in population.ARCHS if (d, a) not in present]
    if not missing:
        return []
    lines = ["## Cells not run", "",
             "Dataset / architecture pairs of the harness without results, and what their populations alone would "
             "cost on one thread: one epoch of the plain retraining loop timed (`benchmarks/population_cost.py`), "
             "times the schedule, times K x (1 + 3.5 x requests) trainings (originals; retrained, half- and "
             "double-schedule per request).", ""]
    rows = []
    for d, a in missing:
        path = cost_path(d, a, results)
        if not path.exists():
            rows.append([f"{d} / {a}", "-", "-", "-", "-", "not measured"])
            continue
        c = json.loads(path.read_text())
        rows.append([f"{d} / {a}", f"{c['epoch_cpu_s']:.1f} ({c['samples_timed']} of {c['num_train']} samples timed)",
                     f"{c['training_cpu_s'] / 60:.1f} ({c['epochs']} epochs)",
                     f"{c['one_request_cpu_s'] / 3600:.1f}", f"{c['cell_cpu_s'] / 3600:.1f} ({c['cell_trainings']:g} trainings)",
                     f"`{c['command']}` on {c['machine']}"])
    import pagekit

    lines += pagekit.table(["cell", "CPU s per epoch", "CPU min per training", "CPU h, one request",
                            "CPU h, both requests", "measured with"], rows)
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=list(population.DATASETS))
    p.add_argument("--archs", nargs="+", default=["ResNet18"], choices=list(population.ARCHS))
    p.add_argument("--batches", type=int, default=0, help="batches to time (0: one whole epoch)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--mnist-root", default=str(population.ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--mnist-train", type=int, default=2000)
    p.add_argument("--mnist-test", type=int, default=1000)
    args = p.parse_args(argv)
    if args.batches < 0:
        p.error(f"--batches must be >= 0 (0 = one whole epoch), got {args.batches}")
    torch.set_num_threads(1)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population_cost.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    machine = f"{platform.machine()} CPU, 1 thread (torch {torch.__version__}), shared 2-core host"
    for d in args.datasets:
        for a in args.archs:
            res = measure(d, a, args)
            res.update(command=command, machine=machine)
            write_json(res, cost_path(d, a))
            print(f"{d} {a}: {res['epoch_cpu_s']:.1f} CPU s/epoch, {res['training_cpu_s']:.0f} s/training, "
                  f"cell {res['cell_cpu_s'] / 3600:.2f} CPU h", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
