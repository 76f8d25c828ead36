"""SISA (exact unlearning) vs retraining vs our approximate default: accuracy, time per request, storage.

    .venv/bin/python benchmarks/sisa.py --data digits
    .venv/bin/python benchmarks/sisa.py --data mnist --data-root /work/shared/data/mnist

For every shards x slices setting: train a SISA run (same sample passes per shard as ``--epochs``
epochs without slicing: ``epochs_per_slice = 2 E / (slices + 1)``), delete ``--samples`` random
training samples one request at a time (seeded), then class 3; time each request end to end
(resolve, verify, retrain the affected shards, write the report). Beside them, on the same
requests, the single model (shards=1, slices=1: a plain training run): full retraining on the
retain data (``lightning_unlearn.retrain``) and our approximate default (``lightning_unlearn.unlearn``
with its defaults). Writes ``benchmarks/results/sisa_<data>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_unlearn import ForgetRequest, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import atomic_write, to_jsonable, write_json
from lightning_unlearn._training import quiet_lightning
from lightning_unlearn.data import load_digits_datasets, load_mnist
from lightning_unlearn.exact import SISA, SISAConfig
from lightning_unlearn.metrics import accuracy, split_accuracies
from lightning_unlearn.models import SmallCNN

RESULTS = Path(__file__).parent / "results"
DEFAULTS = {"digits": {"epochs": 12, "batch_size": 64}, "mnist": {"epochs": 3, "batch_size": 128}}
FORGET_CLASS = 3


def epochs_per_slice(epochs: int, slices: int) -> int:
    value = 2 * epochs / (slices + 1)
    if value != int(value):
        raise ValueError(f"--epochs {epochs} cannot be spread evenly over {slices} slices: use a multiple of {(slices + 1) // 2}")
    return int(value)


def run_setting(train, test, shards: int, slices: int, args, sample_requests, workdir: Path) -> dict:
    config = SISAConfig(shards=shards, slices=slices, epochs_per_slice=epochs_per_slice(args.epochs, slices),
                        batch_size=args.batch_size, seed=args.seed)
    run = SISA(workdir / f"s{shards}_r{slices}", SmallCNN, train, config)
    start = time.perf_counter()
    run.fit()
    train_s = time.perf_counter() - start
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    row = {"shards": shards, "slices": slices, "epochs_per_slice": config.epochs_per_slice, "train_s": train_s,
           "storage_bytes": run.storage_bytes(), "checkpoints": shards * slices,
           "test_acc": accuracy(run.ensemble(), test_loader, 10),
           "test_acc_vote": accuracy(run.ensemble("vote"), test_loader, 10)}
    single = run.shard_model(0) if shards == 1 and slices == 1 else None
    samples = []
    for request in sample_requests:
        t0 = time.perf_counter()
        result = run.forget(request)
        samples.append({"request": request.to_dict(), "seconds": time.perf_counter() - t0,
                        "affected": result.affected})
    row["sample_requests"] = samples
    row["sample_request_s"] = float(np.mean([s["seconds"] for s in samples]))
    request = ForgetRequest(classes=[FORGET_CLASS])
    t0 = time.perf_counter()
    result = run.forget(request)
    row["class_request_s"] = time.perf_counter() - t0
    row["class_request_shards"] = len(result.affected)
    dm = UnlearningDataModule(train, test, request, batch_size=1000)
    row["after_class_request"] = split_accuracies(run.ensemble(), dm)
    shutil.rmtree(run.root)
    print(f"shards={shards} slices={slices}: test acc {row['test_acc']:.4f}, train {train_s:.1f} s, "
          f"sample request {row['sample_request_s']:.2f} s, class request {row['class_request_s']:.1f} s, "
          f"storage {row['storage_bytes'] / 1e6:.1f} MB", flush=True)
    return row, single


def references(single, train, test, args, sample_requests) -> dict:
    """Full retraining and our approximate default on the same requests, from the single model."""
    out = {}
    sample_requests = sample_requests[: args.ref_samples or None]
    for name, requests in (("sample", sample_requests), ("class", [ForgetRequest(classes=[FORGET_CLASS])])):
        rows = {"retrain": [], "approximate": []}
        for i, request in enumerate(requests):
            dm = UnlearningDataModule(train, test, request, batch_size=args.batch_size, seed=args.seed)
            if i == 0 and not args.no_retrain:  # retraining costs the same for every single-sample request
                t0 = time.perf_counter()
                ref = retrain(single, dm, epochs=args.epochs, seed=args.seed)
                rows["retrain"].append({"seconds": time.perf_counter() - t0, "metrics": ref.metrics})
            t0 = time.perf_counter()
            approx = unlearn(single, dm)
            config = getattr(approx, "config", None)  # the defaults it ran with
            rows["approximate"].append({"seconds": time.perf_counter() - t0, "metrics": approx.metrics,
                                        "config": to_jsonable(config) if config is not None else None})
        out[name] = {k: {"seconds": float(np.mean([r["seconds"] for r in v])), "runs": v} for k, v in rows.items() if v}
        print(f"{name} request: approximate {out[name]['approximate']['seconds']:.1f} s", flush=True)
    loader = torch.utils.data.DataLoader(test, batch_size=1000)
    out["single_model_test_acc"] = accuracy(single, loader, 10)
    return out


def retrained_share(row: dict, num_train: int, epochs: int) -> float:
    """Sample passes a single-sample request retrains, as a share of retraining from scratch (load-independent)."""
    shards, slices, e = row["shards"], row["slices"], row["epochs_per_slice"]
    shares = []
    for request in row["sample_requests"]:
        passes = sum(e * (num_train / shards) * (j + 1) / slices
                     for a in request["affected"].values() for j in range(int(a["first_slice"]), slices))
        shares.append(passes / (epochs * num_train))
    return float(np.mean(shares))


def markdown(result: dict) -> str:
    a = result["args"]
    ref = result["references"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [
        f"Command: `{result['command']}` ({result['wall_min']:.1f} min wall, 1 CPU thread per process, "
        f"{result['num_train']} training / {result['num_test']} test images). SmallCNN (16/32 channels, 64 hidden), "
        f"Adam lr 1e-3, batch {a['batch_size']}; {a['epochs']} epochs without slicing, "
        "`epochs_per_slice = 2 E / (slices + 1)` with slicing (the same sample passes); "
        f"{a['samples']} single-sample requests (seeded random ids, one request each, applied in turn), then class {FORGET_CLASS}. "
        "Request times are end to end (resolve, verify hashes, retrain the affected shards, write the report); "
        "ensemble = mean of probabilities.",
        "",
        "| shards | slices | ensemble test acc (%) | vote acc (%) | train (s) | single-sample request (s) | "
        "its retrained sample passes (% of retrain) | "
        "class request (s) | forget acc after class request (%) | remaining acc (%) | checkpoints | storage (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["grid"]:
        after = r["after_class_request"]
        lines.append(
            f"| {r['shards']} | {r['slices']} | {pct(r['test_acc'])} | {pct(r['test_acc_vote'])} | {r['train_s']:.1f} | "
            f"{r['sample_request_s']:.2f} | {100 * retrained_share(r, result['num_train'], a['epochs']):.1f} | "
            f"{r['class_request_s']:.1f} | {pct(after['forget_test_acc'])} | "
            f"{pct(after['remaining_test_acc'])} | {r['checkpoints']} | {r['storage_bytes'] / 1e6:.1f} |"
        )
    lines += [
        "",
        f"Beside them, the single model (shards=1, slices=1; test acc {pct(ref['single_model_test_acc'])}%) on the same requests:",
        "",
        "| method | single-sample request (s) | class request (s) | forget acc after class request (%) | "
        "remaining acc (%) | exact |",
        "|---|---|---|---|---|---|",
    ]
    for name, label, exact in (("retrain", "retrain from scratch (`retrain`)", "yes"),
                               ("approximate", "ours, approximate default (`unlearn`)", "no")):
        if name not in ref["class"]:
            continue
        m = ref["class"][name]["runs"][0]["metrics"]
        n = len(ref["sample"][name]["runs"])
        lines.append(f"| {label} | {ref['sample'][name]['seconds']:.2f}{'' if n > 1 else ' (1 sample)'} | "
                     f"{ref['class'][name]['seconds']:.1f} | "
                     f"{pct(m['forget_test_acc'])} | {pct(m['remaining_test_acc'])} | {exact} |")
    if "retrain" not in ref["class"]:
        one = next(r for r in result["grid"] if r["shards"] == 1 and r["slices"] == 1)
        lines.append(f"| retrain from scratch (= the shards=1 slices=1 row: a deletion there retrains everything) | "
                     f"{one['sample_request_s']:.2f} | {one['class_request_s']:.1f} | "
                     f"{pct(one['after_class_request']['forget_test_acc'])} | "
                     f"{pct(one['after_class_request']['remaining_test_acc'])} | yes |")
    config = ref["class"]["approximate"]["runs"][0].get("config")
    if config:
        lines += ["", "Approximate default = `unlearn(model, dm)` with its resolved settings: "
                  + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(DEFAULTS), default="digits")
    p.add_argument("--data-root", default="/work/shared/data/mnist")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument("--slices", type=int, nargs="+", default=[1, 5])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--samples", type=int, default=3, help="single-sample requests per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where runs are written (deleted after each setting)")
    p.add_argument("--part", default=None,
                   help="run a part of the grid in its own process: write results/sisa_<data>.part-<PART>.json "
                        "(the part with shards=1 slices=1 also runs the references); --merge joins the parts")
    p.add_argument("--merge", action="store_true", help="join results/sisa_<data>.part-*.json into the result files")
    p.add_argument("--references-only", action="store_true",
                   help="train only the single model (shards=1 slices=1, as in the grid) and run the references")
    p.add_argument("--ref-samples", type=int, default=None, help="single-sample requests for the references (default: --samples)")
    p.add_argument("--no-retrain", action="store_true",
                   help="skip lightning_unlearn.retrain: the grid's shards=1 slices=1 deletions are retraining from scratch")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.merge:
        return merge(args.data)
    for slices in args.slices:
        epochs_per_slice(args.epochs, slices)  # fail before any work
    torch.set_num_threads(1)
    train, test = load_digits_datasets(seed=args.seed) if args.data == "digits" else load_mnist(args.data_root)
    rng = np.random.default_rng(args.seed)
    sample_requests = [ForgetRequest(sample_ids=[int(i)]) for i in rng.choice(len(train), args.samples, replace=False)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sisa-bench-"))
    start = time.perf_counter()
    command = "python benchmarks/sisa.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "args": vars(args), "num_train": len(train), "num_test": len(test),
              "grid": [], "references": None}
    out = RESULTS / (f"sisa_{args.data}.json" if args.part is None else f"sisa_{args.data}.part-{args.part}.json")
    RESULTS.mkdir(exist_ok=True)
    single = None
    if args.references_only:
        args.shards, args.slices = [], []
        config = SISAConfig(shards=1, slices=1, epochs_per_slice=args.epochs, batch_size=args.batch_size, seed=args.seed)
        with quiet_lightning():
            run = SISA(workdir / "single", SmallCNN, train, config)
            run.fit()
            single = run.shard_model(0)
    with quiet_lightning():
        for slices in args.slices:
            for shards in args.shards:
                row, model = run_setting(train, test, shards, slices, args, sample_requests, workdir)
                result["grid"].append(row)
                single = model if model is not None else single
                result["wall_min"] = (time.perf_counter() - start) / 60
                write_json(result, out)  # every finished setting is kept
        if single is None and args.part is None:
            raise SystemExit("the grid needs shards=1 slices=1 (the single model the references start from)")
        if single is not None:
            result["references"] = references(single, train, test, args, sample_requests)
    result["wall_min"] = (time.perf_counter() - start) / 60
    write_json(result, out)
    if args.part is None:
        write_markdown(result, args.data)
    return 0


def write_markdown(result: dict, data: str) -> None:
    text = markdown(result)
    atomic_write(RESULTS / f"sisa_{data}.md", lambda f: f.write(text.encode()))
    print(text)


def render_page(results: Path) -> str:
    """docs/benchmarks/sisa.md from sisa_digits.json and sisa_mnist.json."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pagekit

    names = {"digits": "sisa_digits.json", "MNIST (full: 60,000 train / 10,000 test)": "sisa_mnist.json"}
    records = {title: pagekit.load(results, n) for title, n in names.items()}
    intro = ("For every shards x slices setting a SISA run is trained (`lightning_unlearn.exact.SISA`, SmallCNN per "
             "shard, mean-of-probabilities ensemble), then the same requests are served one after another: "
             "single-sample requests, then class 3. \"Retrain\" and the approximate method start from the single "
             "model (shards=1, slices=1) on the same requests. Accuracies are deterministic; timings were taken while "
             "other jobs shared the machine: compare them within a table, as ratios.")
    lines = pagekit.header("Exact unlearning (SISA)", "sisa.py", names.values(),
                           [r["command"] for r in records.values()],
                           ["1 CPU thread per process on a shared 2-core machine (not recorded in the files)"], intro)
    for title, rec in records.items():
        lines += [f"## {title}", "", *markdown(rec).splitlines(), ""]
    return pagekit.finish(lines)


def merge(data: str) -> int:
    """Join the parts of a grid run in several processes (settings in the parts' order)."""
    import json

    parts = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"sisa_{data}.part-*.json"))]
    if not parts:
        raise SystemExit(f"no results/sisa_{data}.part-*.json to merge")
    holders = sorted((p for p in parts if p["references"] is not None),
                     key=lambda p: not p["args"].get("references_only"))  # a --references-only part first
    if not holders:
        raise SystemExit("no part holds the references (shards=1 slices=1 or --references-only)")
    refs = [holders[0]["references"]]
    grid = sorted((row for p in parts for row in p["grid"]), key=lambda r: (r["slices"], r["shards"]))
    result = {**parts[0], "grid": grid, "references": refs[0],
              "command": " & ".join(p["command"] for p in parts) + "; python benchmarks/sisa.py --merge --data " + data,
              "wall_min": max(p["wall_min"] for p in parts), "parts": [p["command"] for p in parts]}
    write_json(result, RESULTS / f"sisa_{data}.json")
    write_markdown(result, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
