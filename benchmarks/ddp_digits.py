"""DDP wall time of SelectiveUnlearning on digits: 1 vs 2 CPU processes (gloo).

    python benchmarks/ddp_digits.py [--repeats 2]

Runs tests/scripts/ddp_unlearn.py (2 epochs of unlearning a SmallCNN, class 3) and writes
benchmarks/results/ddp_digits.json. On a 2-core machine two processes compete for the same cores,
so this measures correctness overhead, not a speed-up; on GPUs each rank has its own device.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(devices: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // devices))}
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "tests/scripts/ddp_unlearn.py"), out, str(devices)], env=env,
                       check=True, capture_output=True)
        wall = time.perf_counter() - start
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
    return {"devices": devices, "process_wall_s": wall, "fit_s": max(r["fit_seconds"] for r in ranks),
            "same_mask": len({r["mask_sha256"] for r in ranks}) == 1, "frozen_exact": all(r["frozen_exact"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/ddp_digits.json"))
    args = parser.parse_args()
    rows = []
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        rows += [run(1), run(2)]
    summary = {d: {k: statistics.median(r[k] for r in rows if r["devices"] == d) for k in ("process_wall_s", "fit_s")}
               for d in (1, 2)}
    result = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "runs": rows, "median": summary}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for d in (1, 2):
        print(f"{d} process(es): fit {summary[d]['fit_s']:.1f}s, whole process {summary[d]['process_wall_s']:.1f}s")
    print("masks identical and frozen elements exact on every rank:", all(r["same_mask"] and r["frozen_exact"] for r in rows))


def render_page(results: Path) -> str:
    """docs/benchmarks/ddp_digits.md from ddp_digits.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pagekit

    rec = pagekit.load(results, "ddp_digits.json")
    intro = ("`tests/scripts/ddp_unlearn.py` (SelectiveUnlearning, 2 epochs, class 3, SmallCNN with AdamW + weight "
             "decay) with `devices=1` and with `strategy=\"ddp\", devices=2, accelerator=\"cpu\"` (gloo), "
             "interleaved. Two CPU processes split the same cores: this shows that DDP is correct (same mask on every "
             "rank, frozen elements and BatchNorm buffers bit-exact) and what process start and gloo set-up cost on "
             "tiny data, not a speed-up; no GPU was available to measure one.")
    lines = pagekit.header("DDP: 1 vs 2 processes (digits)", "ddp_digits.py", ["ddp_digits.json"],
                           [f"python {rec['command']} --repeats 2"], [f"{rec['cpus']} CPUs, shared with other jobs"], intro)
    lines += pagekit.table(["run", "processes", "process wall s", "fit s", "same mask on every rank", "frozen exact"],
                           [[i + 1, r["devices"], f"{r['process_wall_s']:.1f}", f"{r['fit_s']:.1f}", r["same_mask"],
                             r["frozen_exact"]] for i, r in enumerate(rec["runs"])])
    lines += ["", "Median over runs: " + "; ".join(f"{k} process(es): fit {v['fit_s']:.1f} s, process "
                                                   f"{v['process_wall_s']:.1f} s" for k, v in rec["median"].items()) + "."]
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
