"""A default that really forgets: the default procedure against retraining, on four architectures.

For each dataset, architecture and seed one original model is trained on all training data; for each request
(class 3; a random 10% of the training samples) the exact reference is retrained from scratch on the retain
set (same epochs, same process, same thread), then :func:`lightning_unlearn.unlearn` runs from the same
original with:

- ``explained``: the library's default scoring and selection at each ``--ratios`` value;
- ``random``: random channels at the same ratios (``mask=random_channel_mask(...)``, same head rows);
- ``head_row``: only the forgotten classes' head rows (``mask=output_row_mask(...)``; the whole head for
  sample requests);

each with the procedure's defaults otherwise (``--reset`` / ``--objective`` compare alternatives).
Recorded per run: forget / remaining / test accuracy, relearn steps (class requests; target: the original's
forget accuracy - 2 points), unlearning and retraining wall time, the fraction of parameters selected, the
steps taken and the stopping history. Rows are appended to ``benchmarks/results/forgetting_<dataset>.json``
as they finish; a rerun skips rows already there. ``--table`` prints the markdown tables from those files.

    .venv/bin/python benchmarks/forgetting.py                       # digits, 4 architectures, seeds 0 1 2
    .venv/bin/python benchmarks/forgetting.py --datasets mnist --mnist-root /work/shared/data/mnist \\
        --mnist-train 10000 --archs SmallCNN ResNetBN MLP --seeds 0 --requests class --ratios 0.1
    .venv/bin/python benchmarks/forgetting.py --table
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES, build  # noqa: E402

from lightning_unlearn import ForgetRequest, UnlearnConfig, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import write_json  # noqa: E402
from lightning_unlearn._training import fit  # noqa: E402
from lightning_unlearn.baselines.controls import output_row_mask, random_channel_mask
from lightning_unlearn.data import load_digits_datasets, load_mnist  # noqa: E402
from lightning_unlearn.evidence.report import library_versions
from lightning_unlearn.evidence.evaluate import relearn_steps  # noqa: E402
from lightning_unlearn.metrics import split_accuracies  # noqa: E402
from lightning_unlearn.request import random_samples_request  # noqa: E402
from lightning_unlearn.reset import RESETS  # noqa: E402
from lightning_unlearn.repair.objectives import OBJECTIVES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("digits", "mnist")
REQUESTS = ("class", "samples")
SELECTIONS = ("explained", "random", "head_row")
DEFAULT = "default"  # --reset / --objective value meaning "the library's default"
#: Training (and retraining) epochs per dataset and architecture: each reaches a sensible test accuracy
#: (digits, seed 0: SmallCNN 99.1%, ResNetBN 99.3%, MLP 97.1%, ResNet18 97.1%) within the CPU budget.
EPOCHS = {
    "digits": {"SmallCNN": 15, "ResNetBN": 15, "MLP": 15, "ResNet18": 6},
    "mnist": {"SmallCNN": 5, "ResNetBN": 5, "MLP": 10, "ResNet18": 3},
}
BATCH_SIZE = 64
IMAGE_SIZE = {"digits": 8, "mnist": 28}
REQUEST_NAMES = {"class": "class 3", "samples": "random 10%"}
#: The targets: within this many accuracy points of retraining on forget / remaining / test.
TARGET_POINTS = 1.0


class _AllData(pl.LightningDataModule):
    """Every training sample: the original model sees the data that will later be forgotten."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        super().__init__()
        self.dataset, self.seed = dataset, seed

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=BATCH_SIZE, shuffle=True, generator=gen)


class _StepCount(Callback):
    """Optimizer steps of one fit (for library versions whose result does not report them)."""

    steps: int | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps = int(trainer.global_step)


# -- data ---------------------------------------------------------------------------------------------------
def load(dataset: str, args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    if dataset == "digits":
        return load_digits_datasets(seed=0)
    train, test = load_mnist(args.mnist_root)
    gen = torch.Generator().manual_seed(1234)  # a fixed subsample, the same for every seed and architecture
    if args.mnist_train:
        train = Subset(train, torch.randperm(len(train), generator=gen)[: args.mnist_train].sort().values.tolist())
    if args.mnist_test:
        test = Subset(test, torch.randperm(len(test), generator=gen)[: args.mnist_test].sort().values.tolist())
    return train, test


def dataset_label(dataset: str, args: argparse.Namespace) -> str:
    """``digits``, ``mnist`` (all 60,000) or ``mnist-<N>`` (a seeded training subset): rows of different sizes never mix."""
    return f"{dataset}-{args.mnist_train}" if dataset == "mnist" and args.mnist_train else dataset


def make_request(kind: str, num_train: int, seed: int) -> ForgetRequest:
    return ForgetRequest(classes=[3]) if kind == "class" else random_samples_request(num_train, fraction=0.1, seed=seed)


# -- one grid cell ------------------------------------------------------------------------------------------
def row_key(row: dict[str, Any]) -> tuple:
    return (row["dataset"], row["arch"], row["seed"], row["request"], row["selection"], row.get("ratio"),
            row.get("reset"), row.get("objective"))


def planned_rows(dataset: str, arch: str, seed: int, request: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows one (dataset, architecture, seed, request) cell should hold, without results."""
    base = {"dataset": dataset, "arch": arch, "seed": seed, "request": request}
    rows = [{**base, "selection": "original", "ratio": None, "reset": None, "objective": None},
            {**base, "selection": "retrain", "ratio": None, "reset": None, "objective": None}]
    for reset in args.reset:
        for objective in args.objective:
            for selection in args.selections:
                for ratio in (args.ratios if selection != "head_row" else [None]):
                    rows.append({**base, "selection": selection, "ratio": ratio, "reset": reset, "objective": objective})
    return rows


def unlearning_config(seed: int, ratio: float | None, reset: str, objective: str) -> UnlearnConfig:
    """The library's defaults, with only what the row varies replaced."""
    overrides: dict[str, Any] = {"seed": seed}
    if ratio is not None:
        overrides["ratio"] = ratio
    if reset != DEFAULT:
        overrides["reset"] = reset
    if objective != DEFAULT:
        overrides["objective"] = objective
    return UnlearnConfig.build(None, **overrides)


def run_unlearning(original: pl.LightningModule, dm: UnlearningDataModule, row: dict[str, Any]) -> dict[str, Any]:
    """One ``unlearn`` call for ``row``'s selection; timed from mask construction to the returned model."""
    config = unlearning_config(row["seed"], row["ratio"], row["reset"], row["objective"])
    counter = _StepCount()
    start = time.perf_counter()
    mask = None
    if row["selection"] == "random":
        mask = random_channel_mask(original, dm, row["ratio"], seed=row["seed"])
    elif row["selection"] == "head_row":
        mask = output_row_mask(original, dm)
    kwargs = {"mask": mask} if mask is not None else {}
    if mask is not None and "mask" not in inspect.signature(unlearn).parameters:
        raise RuntimeError("this lightning_unlearn's unlearn() takes no mask=; run --selections explained only")
    result = unlearn(original, dm, config, trainer_kwargs={"callbacks": [counter]}, **kwargs)
    seconds = time.perf_counter() - start
    extra = result.extra or {}
    resolved = result.config.to_dict() if result.config is not None else config.to_dict()
    return {
        "metrics": result.metrics,
        "unlearn_seconds": seconds,
        "timings_s": result.timings_s,
        "param_fraction": result.mask.fraction if result.mask is not None else None,
        "steps": extra.get("steps", counter.steps),
        "stop_reason": extra.get("stop_reason"),
        "stopping": extra.get("stopping"),
        "config": {k: v for k, v in resolved.items() if k not in ("layers",)},
        "model": result.model,
    }


def relearn(model: pl.LightningModule, dm: UnlearningDataModule, target: float | None, args, seed: int) -> int | None:
    """Relearn steps for class requests (None when not relearned within the budget or not a class request)."""
    if target is None:
        return None
    return relearn_steps(model, dm, target, max_steps=args.relearn_max_steps, eval_every=args.relearn_every, seed=seed)


def run_cell(dataset: str, arch: str, seed: int, train: Dataset, test: Dataset, kinds: list[str],
             done: set[tuple], args: argparse.Namespace, emit) -> None:
    """Train one original, then every pending row of every request kind for it."""
    pending = {k: [r for r in planned_rows(dataset, arch, seed, k, args) if row_key(r) not in done] for k in kinds}
    if not any(pending.values()):
        return
    kind = dataset.split("-")[0]
    epochs = args.epochs or EPOCHS[kind][arch]
    pl.seed_everything(seed, verbose=False)
    original = build(arch, num_classes=10, image_size=IMAGE_SIZE[kind], epochs=epochs)
    start = time.perf_counter()
    fit(original, _AllData(train, seed), epochs)
    train_seconds = time.perf_counter() - start
    original.eval()
    for kind in kinds:
        if not pending[kind]:
            continue
        request = make_request(kind, len(train), seed)
        dm = UnlearningDataModule(train, test, request, batch_size=BATCH_SIZE, seed=seed, num_classes=10)
        original_metrics = split_accuracies(original, dm)
        target = original_metrics["forget_acc"] - 0.02 if kind == "class" else None
        common = {"epochs": epochs, "relearn_target": target, "relearn_max_steps": args.relearn_max_steps}
        for row in pending[kind]:
            if row["selection"] == "original":
                emit({**row, **common, **original_metrics, "train_seconds": train_seconds, "param_fraction": None})
                continue
            if row["selection"] == "retrain":
                pl.seed_everything(seed, verbose=False)
                ref = retrain(original, dm, epochs=epochs, seed=seed)
                steps = relearn(ref.model, dm, target, args, seed)
                emit({**row, **common, **ref.metrics, "retrain_seconds": ref.timings_s["total"],
                      "relearn_steps": steps, "param_fraction": 1.0})
                continue
            pl.seed_everything(seed, verbose=False)
            out = run_unlearning(original, dm, row)
            steps = relearn(out.pop("model"), dm, target, args, seed)
            metrics = out.pop("metrics")
            emit({**row, **common, **metrics, **out, "relearn_steps": steps})


# -- results file ---------------------------------------------------------------------------------------------
def results_path(dataset: str, args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else RESULTS / f"forgetting_{dataset}.json"


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text())["rows"]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for dataset in args.datasets:
        train, test = load(dataset, args)
        label = dataset_label(dataset, args)
        path = results_path(label, args)
        rows = read_rows(path)
        done = {row_key(r) for r in rows}
        header = {"dataset": label, "num_train": len(train), "num_test": len(test), "threads": args.threads,
                  "versions": library_versions(), "git_commit": _git_commit(),
                  "command": " ".join(["python", *sys.argv])}

        def emit(row: dict[str, Any]) -> None:
            row = {**row, "git_commit": header["git_commit"]}  # the defaults a row ran with
            rows.append(row)
            write_json({**header, "rows": rows}, path)
            shown = {k: row.get(k) for k in ("arch", "seed", "request", "selection", "ratio", "reset", "objective")}
            print(f"{shown} forget {_pct(row.get('forget_acc'))} remaining {_pct(row.get('remaining_acc'))} test "
                  f"{_pct(row.get('test_acc'))} relearn {row.get('relearn_steps')} steps {row.get('steps')} "
                  f"({row.get('unlearn_seconds') or row.get('retrain_seconds') or row.get('train_seconds'):.1f}s)",
                  flush=True)

        for arch in args.archs:
            for seed in args.seeds:
                run_cell(label, arch, seed, train, test, args.requests, done, args, emit)


def _git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when the library has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "lightning_unlearn"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# -- tables ---------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float, int] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def _cell(stat: tuple[float, float, int] | None, scale: float = 100.0, digits: int = 1, prefix: str = "") -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{prefix}{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def _group_rows(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple, list[dict[str, Any]]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["request"]), []).append(r)
    def order(item):
        (dataset, request), _ = item
        name, _, size = dataset.partition("-")
        return DATASETS.index(name), -int(size or 10**9), REQUESTS.index(request)

    yield from sorted(groups.items(), key=order)


def _variant(row: dict[str, Any]) -> tuple:
    return (row["selection"], row.get("ratio"), row.get("reset"), row.get("objective"))


def _label(variant: tuple) -> str:
    selection, ratio, reset, objective = variant
    text = selection + (f" {ratio:g}" if ratio is not None else "")
    extras = [f"reset={reset}"] if reset not in (None, DEFAULT) else []
    extras += [f"objective={objective}"] if objective not in (None, DEFAULT) else []
    return text + (f" ({', '.join(extras)})" if extras else "")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables: per (dataset, request), per architecture the retrained row first, then each variant."""
    out = []
    head = ("| arch | selection | forget | remaining | test | Δforget | Δremaining | Δtest | relearn steps | "
            "steps | time (s) | time / retrain | % params | targets |")
    for (dataset, request), group in _group_rows(rows):
        out += [f"### {dataset}, {REQUEST_NAMES[request]}", "", head, "|" + "---|" * (head.count("|") - 1)]
        for arch in [a for a in ARCHITECTURES if any(r["arch"] == a for r in group)]:
            mine = [r for r in group if r["arch"] == arch]
            refs = {r["seed"]: r for r in mine if r["selection"] == "retrain"}
            if not refs:
                continue
            cap = max((r.get("relearn_max_steps") or 0) for r in mine)
            order = [("retrain", None, None, None)]
            variants = sorted({_variant(r) for r in mine if r["selection"] not in ("retrain", "original")},
                              key=lambda v: (SELECTIONS.index(v[0]), v[2] != DEFAULT or v[3] != DEFAULT, str(v[2]),
                                             str(v[3]), v[1] or 0))
            for variant in order + variants:
                runs = [r for r in mine if _variant(r) == variant and r["seed"] in refs] if variant[0] != "retrain" \
                    else list(refs.values())
                if not runs:
                    continue
                out.append(_table_row(arch, variant, runs, refs, cap, request))
        out.append("")
    return "\n".join(out)


def _table_row(arch: str, variant: tuple, runs: list[dict[str, Any]], refs: dict[int, dict[str, Any]], cap: int,
               request: str) -> str:
    is_ref = variant[0] == "retrain"
    acc = {k: _stats([r.get(k) for r in runs]) for k in ("forget_acc", "remaining_acc", "test_acc")}
    gaps = {k: _stats([abs(r[k] - refs[r["seed"]][k]) for r in runs if r.get(k) is not None]) for k in acc}
    relearned = [r.get("relearn_steps") for r in runs]
    relearn_stat = None
    if request == "class":
        relearn_stat = _stats([cap if s is None else s for s in relearned])
    relearn_text = _cell(relearn_stat, 1.0, 0, prefix="≥" if any(s is None for s in relearned) else "")
    seconds = [r.get("retrain_seconds") if is_ref else r.get("unlearn_seconds") for r in runs]
    ratio = _stats([r["unlearn_seconds"] / refs[r["seed"]]["retrain_seconds"] for r in runs]) if not is_ref else None
    params = _stats([r.get("param_fraction") for r in runs])
    steps = _stats([r.get("steps") for r in runs])
    cells = [arch if is_ref else "", "**retrain**" if is_ref else _label(variant),
             *(_cell(acc[k]) for k in acc), *("-" if is_ref else _cell(gaps[k]) for k in gaps),
             relearn_text, "-" if is_ref else _cell(steps, 1.0, 0), _cell(_stats(seconds), 1.0, 1),
             "-" if is_ref else _cell(ratio, 1.0, 3), _cell(params, 100.0, 2 if params and params[0] >= 1e-3 else 4),
             "" if is_ref else
             _targets(gaps, relearn_stat, _stats([cap if r.get("relearn_steps") is None else r["relearn_steps"]
                                                  for r in refs.values() if r["seed"] in {x["seed"] for x in runs}]),
                      request)]
    return "| " + " | ".join(cells) + " |"


def _targets(gaps: dict[str, Any], relearn_stat, ref_relearn, request: str) -> str:
    """✓ when every target is met (mean over seeds), else the misses."""
    missed = [name.split("_")[0] for name, stat in gaps.items() if stat is None or stat[0] * 100 > TARGET_POINTS]
    if request == "class" and (relearn_stat is None or ref_relearn is None or relearn_stat[0] < ref_relearn[0]):
        missed.append("relearn")
    return "✓" if not missed else "✗ " + ", ".join(missed)


def print_tables(args: argparse.Namespace) -> None:
    rows = []
    paths = [Path(args.out)] if args.out else sorted(RESULTS.glob("forgetting_*.json"))
    for path in paths:
        rows += read_rows(path)
    latest = {row_key(r): r for r in rows}  # one row per key, the latest written
    print(table(list(latest.values())))


# -- documentation page ----------------------------------------------------------------------------------------
PAGE_INTRO = (
    "The library's default procedure (score channels, remove them, repair them on retain data under the mask, "
    "`max_steps=\"auto\"`, evidence-based stopping) against retraining from scratch, on four architectures "
    "(`benchmarks/architectures.py`: SmallCNN; ResNetBN, a 3-block residual BatchNorm net with AdamW + cosine; MLP, "
    "2 hidden layers, SGD momentum; ResNet18, ResNet-18's layout with a 3x3 one-channel stem). Per dataset, "
    "architecture and seed one original is trained on all data and, per request, one model is retrained from scratch "
    "on the retain data (same epochs, same process and thread). `unlearn` then runs from the original with "
    "`explained` (the default scoring and selection at the ratio shown), `random` (random channels at the same ratio, "
    "same head rows) and `head_row` (only the forgotten class's head row; the whole head for sample requests); "
    "**the default is `explained 0.1`**. Accuracies in %; Δ = |difference to that seed's retrained model| in points; "
    "relearn steps: Adam steps (batch 32, half forget, half retain, checked every 2 steps, cap 200) until the "
    "forgotten class's test accuracy is back within 2 points of the original's (class requests only; ≥: not within "
    "the cap); time: unlearning wall time including scoring and mask construction; time / retrain: per seed, in the "
    "same process. `targets`: ✓ when the means over seeds meet all three targets (Δ ≤ 1 point on forget, remaining "
    "and test accuracy; relearn steps ≥ the retrained model's), else the ones missed. Mean ± std over seeds. Every "
    "row records the commit it ran at."
)
PAGE_FILES = [
    ("At the current defaults", ["final_forgetting_digits.json", "final_forgetting_digits_resnet18.json",
                                 "final_forgetting_mnist10k.json"],
     "`reset=\"dampen\"`, BatchNorm statistics of the selected channels re-estimated on retain data, the random-label "
     "term for class requests paused once held-out data shows the class forgotten, retain data only for sample "
     "requests, `max_steps=\"auto\"` (two epochs of retain batches clamped to 100-200 steps), stopping tolerance 1 "
     "point, patience 5 checks."),
    ("Earlier defaults", ["forgetting_digits.json", "forgetting_digits_resnet18.json", "forgetting_mnist-10000.json"],
     "Before the current defaults: `reset=\"reinit\"` and the random-label term on for the whole repair (rows "
     "marked `reset=...` compare resets at those defaults). Kept because the current defaults were chosen from these "
     "tables."),
]


def render_page(results: Path) -> str:
    """docs/benchmarks/forgetting.md from the results files of PAGE_FILES (current defaults first)."""
    import pagekit

    records = {name: pagekit.load(results, name) for _, names, _ in PAGE_FILES for name in names}
    lines = pagekit.header("Forgetting at the previous defaults (dampen, random labels; four architectures)", "forgetting.py", records,
                           [r["command"] for r in records.values()],
                           [pagekit.machine(r) for r in records.values()], PAGE_INTRO)
    for title, names, note in PAGE_FILES:
        lines += [f"## {title}", "", note, ""]
        for name in names:
            rec = records[name]
            lines += [f"Results file `{name}`: `{rec['command']}` ({rec['num_train']} training / {rec['num_test']} "
                      f"test images).", ""]
            lines += [t.replace("### ", "### " + ("" if title.startswith("At") else "earlier defaults: "), 1)
                      if t.startswith("### ") else t for t in table(rec["rows"]).splitlines()]
            lines.append("")
    return pagekit.finish(lines)


# -- command line ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["digits"])
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST idx .gz files")
    p.add_argument("--mnist-train", type=int, default=0, help="seeded MNIST training subset size (0: all 60,000)")
    p.add_argument("--mnist-test", type=int, default=0, help="seeded MNIST test subset size (0: all 10,000)")
    p.add_argument("--archs", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--requests", nargs="+", choices=REQUESTS, default=list(REQUESTS))
    p.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3])
    p.add_argument("--reset", nargs="+", choices=[DEFAULT, *RESETS], default=[DEFAULT],
                   help="resets to compare ('default': the library's)")
    p.add_argument("--objective", nargs="+", choices=[DEFAULT, "auto", *OBJECTIVES], default=[DEFAULT],
                   help="objectives to compare ('default': the library's)")
    p.add_argument("--epochs", type=int, default=0, help="training epochs for every architecture (0: EPOCHS table)")
    p.add_argument("--relearn-max-steps", type=int, default=200)
    p.add_argument("--relearn-every", type=int, default=2, help="relearn accuracy check interval (steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/forgetting_<dataset>.json)")
    p.add_argument("--table", action="store_true", help="print the markdown tables of the results files and exit")
    args = p.parse_args(argv)
    if "mnist" in args.datasets and not args.table and not args.mnist_root:
        p.error("--datasets mnist needs --mnist-root (the folder with the MNIST idx .gz files)")
    if args.out and len(args.datasets) > 1 and not args.table:
        p.error(f"--out names one file; give one dataset, got {args.datasets}")
    bad = [r for r in args.ratios if not 0 < r <= 1]
    if bad:
        p.error(f"ratios must be in (0, 1], got {bad}")
    for name in ("mnist_train", "mnist_test", "epochs"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print_tables(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
