"""Runs SUPREME's peers through the population harness and writes ``benchmarks/results/peers_<cell>.json``.

One harness process per cell (UNSIR runs on class requests only: SUPREME rejects it for sample
requests), with ``--plugin benchmarks/peers/supreme_methods.py`` and the same cache directory as the
harness's own runs, so the originals and the retrained populations are the cached ones. Each cell's JSON
is the harness's (reference rows recomputed and the retraining time measured in the same run), moved
to ``peers_<dataset>_<arch>_<request>.json`` with the command that produced it; method rows of an
earlier run of the cell that this run did not redo are kept (the harness's merge). Peers' environment only:

    OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/run_population.py \\
        --archs SmallCNN SmallCNN-GN [--requests class3 samples100] [--methods supreme_scrub ...] [harness options]
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

import population  # noqa: E402
from population_task import load_plugin  # noqa: E402

PLUGIN = HERE / "supreme_methods.py"
SUFFIX = "_peers-run"  # the harness's --out-suffix for the file it writes; renamed right after
CLASS_ONLY = {"supreme_unsir"}  # SUPREME's validate_method_compatibility: UNSIR is not for random_ requests


def peers_path(dataset: str, arch: str, request: str) -> Path:
    return population.RESULTS / f"peers_{dataset}_{arch}_{request}.json"


def render_page(results: Path = population.RESULTS) -> str:
    """docs/benchmarks/peers.md: the harness's tables (``population.cell_sections``) for the peers' cells."""
    import pagekit

    _, cells, lines = pagekit.cells_page(
        results, "peers_*.json", "SUPREME's peers in the population harness", "peers/run_population.py",
        "SUPREME 0.1.5's own code at its own defaults (`benchmarks/peers/README.md`: its own virtual environment), "
        "run through the population harness; the rows in italics are the harness's reference rows, recomputed in "
        "the same run. The library's own rows on the same cells are on the [population evidence page](population.md). "
        + population.INTRO)
    return pagekit.finish(lines + population.cell_sections(cells))


def render() -> int:
    """Write docs/benchmarks/peers.md (``render_all``)."""
    import render_all

    return render_all.main(["--only", "peers"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits"], choices=list(population.DATASETS))
    p.add_argument("--archs", nargs="+", default=["SmallCNN", "SmallCNN-GN"], choices=list(population.ARCHS))
    p.add_argument("--requests", nargs="+", default=list(population.REQUESTS), choices=list(population.REQUESTS))
    p.add_argument("--methods", nargs="+", default=None, help="peer names (default: all of PEERS)")
    p.add_argument("--render", action="store_true", help="write docs/benchmarks/peers.md from the peers_*.json only")
    args, harness = p.parse_known_args(argv)
    if args.render:
        return render()
    for flag in ("--plugin", "--out-suffix", "--render"):
        if flag in harness:
            p.error(f"{flag} is set by this runner; pass the other harness options only")
    peers = load_plugin(PLUGIN)
    methods = args.methods or list(peers)
    unknown = [m for m in methods if m not in peers]
    if unknown:
        p.error(f"unknown peers {unknown}; allowed are {sorted(peers)}")
    command = "OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/run_population.py " + shlex.join(argv)
    for dataset in args.datasets:
        for arch in args.archs:
            for request in args.requests:
                chosen = [m for m in methods if request == "class3" or m not in CLASS_ONLY]
                if not chosen:
                    continue
                out, tmp = peers_path(dataset, arch, request), population.result_path(dataset, arch, request + SUFFIX)
                if out.exists():  # let the harness keep this cell's earlier method rows
                    shutil.copyfile(out, tmp)
                cell = ["--plugin", str(PLUGIN), "--out-suffix", SUFFIX, "--datasets", dataset, "--archs", arch,
                        "--requests", request, "--methods", *chosen, *harness]
                # a child process running population.py as __main__, exactly as the harness's own runs do: the
                # cache keys name the model class with its module (__main__.SmallCNNGroupNorm), so only then are
                # the cached populations the same entries
                code = subprocess.call([sys.executable, str(HERE.parent / "population.py"), *cell],
                                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
                if code:
                    return code
                res = json.loads(tmp.read_text())
                res.update(command=command, harness_argv=cell, python=sys.executable,
                           machine=f"{platform.machine()} CPU, 1 thread, shared 2-core host, peers' environment")
                for row in res["rows"]:
                    if row["kind"] == "method" and row["method"] in chosen:
                        row["command"] = command
                out.write_text(json.dumps(res, indent=2) + "\n")
                tmp.unlink()
                print(f"wrote {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
