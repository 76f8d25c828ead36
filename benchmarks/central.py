"""Centralised benchmark: every method on digits and MNIST, class-level and random-sample forgetting.

For each dataset and seed one original model is trained on all training data; for each
request (class 3; a random 10% of the training samples) the exact reference is retrained
from scratch on the retain set, then every method unlearns from the same original. Each
unlearned model is evaluated with lightning_unlearn.evidence (accuracy splits, MIA-efficacy
with its shadow accuracy, loss-attack AUC, probe, relearn steps) and compared with the
retrained one (Avg. Gap). Writes benchmarks/results/central_<dataset>.json and renders
docs/benchmarks/central.md from the result files on disk (``--markdown FILE``: that file's section instead).

    .venv/bin/python benchmarks/central.py --datasets digits mnist --mnist-root ../shared/data/mnist

Never part of ``make test``; tests run ``--smoke`` (digits, one seed, two methods).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.baselines import BASELINES, run_method
from lightning_unlearn.data import load_digits_datasets, load_mnist
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.evidence import evaluate_model
from lightning_unlearn.evidence.gap import ACC_GAP_KEYS, avg_gap
from lightning_unlearn.evidence.backdoor import BackdoorDataset, choose_poison
from lightning_unlearn.evidence.evaluate import BackdoorSpec, random_samples_request
from lightning_unlearn.evidence.compare import aggregate
from lightning_unlearn.evidence.report import library_versions
from lightning_unlearn.evidence.evaluate import relearn_steps
from lightning_unlearn.evidence.compare import format_cell
from lightning_unlearn.models import SmallCNN

SECTION = "## Centralised methods (digits, MNIST)"
ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (
    ("forget_acc", "forget acc"),
    ("remaining_acc", "remaining acc"),
    ("test_acc", "test acc"),
    ("mia_efficacy", "MIA-eff [shadow acc]"),
    ("loss_auc", "loss-attack AUC"),
    ("backdoor_asr", "backdoor ASR"),
    ("probe_forget_acc", "probe acc (forgotten class)"),
    ("avg_gap", "Avg. Gap (pts)"),
    ("acc_gap", "acc-only gap (pts)"),
    ("relearn_steps", "relearn steps"),
    ("param_fraction", "params updated"),
    ("seconds", "time (s)"),
)
#: Benchmark labels that differ from the library's method names (results on disk keep the label "ours").
LIBRARY_NAMES = {"ours": "selective"}
LABELS = [next((k for k, v in LIBRARY_NAMES.items() if v == m), m) for m in BASELINES]
# Per-method hyper-parameters (the same on both datasets). Unlearning epochs: --digits-unlearn-epochs / --mnist-unlearn-epochs.
PARAMS: dict[str, dict[str, Any]] = {
    # The two controls use the core method's objective, so they differ from it only in which parameters move.
    "ours": {"method": "grad_x_act", "ratio": 0.1, "objective": "ascent"},
    "retrain": {},
    "output_row": {"objective": "ascent"},
    "random_channels": {"ratio": 0.1, "objective": "ascent"},
    "finetune": {},
    "neggrad_plus": {},
    "random_label": {},
    "salun": {"ratio": 0.5},
    "ssd": {"alpha": 100.0, "lam": 1.0},  # paper default alpha=10 wrecks this small CNN (digits: remaining 15%); 100 chosen on digits seed 0
}


class _AllData(pl.LightningDataModule):
    def __init__(self, dataset: Dataset, batch_size: int, seed: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, generator=gen)


def load(dataset: str, args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    if dataset == "digits":
        return load_digits_datasets(seed=0)
    if dataset == "mnist":
        train, test = load_mnist(args.mnist_root)
        gen = torch.Generator().manual_seed(1234)  # fixed subsample, the same for every seed
        train = Subset(train, torch.randperm(len(train), generator=gen)[: args.mnist_train].sort().values.tolist())
        test = Subset(test, torch.randperm(len(test), generator=gen)[: args.mnist_test].sort().values.tolist())
        return train, test
    raise ValueError(f"unknown dataset {dataset!r}; allowed datasets are ['digits', 'mnist']")


def requests(dataset: str, train: Dataset, seed: int, kinds: list[str]) -> list[tuple[str, Dataset, ForgetRequest, BackdoorSpec | None]]:
    """(name, training set, request, backdoor spec) per requested kind; the backdoor one trains on poisoned data."""
    out = []
    if "class" in kinds:
        out.append(("class 3", train, ForgetRequest(classes=[3]), None))
    if "samples" in kinds:
        out.append(("random 10%", train, random_samples_request(len(train), fraction=0.1, seed=seed), None))
    if "backdoor" in kinds:
        # trigger: a bright square in the bottom-right corner (the brightest pixel value of the data)
        spec = BackdoorSpec(target_class=0, size=2 if dataset == "digits" else 3, value=_max_pixel(train))
        poison = choose_poison(dataset_targets(train), 0.1, spec.target_class, seed)
        poisoned = BackdoorDataset(train, poison, spec.target_class, spec.size, spec.value)
        out.append(("backdoored 10% (trigger -> class 0)", poisoned, ForgetRequest(sample_ids=poison.tolist()), spec))
    return out


def _max_pixel(train: Dataset) -> float:
    return float(max(train[i][0].max() for i in range(min(len(train), 500))))


def evaluate_row(model, dm, reference: dict | None, seed: int, args, target_acc: float, backdoor=None) -> dict[str, Any]:
    metrics = evaluate_model(model, dm, seed=seed, max_samples=args.eval_samples, backdoor=backdoor)
    metrics.pop("per_class_test_acc")
    if reference is not None:
        metrics["avg_gap"] = avg_gap(metrics, reference)
        metrics["acc_gap"] = avg_gap(metrics, reference, ACC_GAP_KEYS)
    steps = relearn_steps(model, dm, target_acc, max_samples=args.eval_samples, max_steps=args.relearn_steps,
                          eval_every=10, seed=seed)
    metrics["relearn_steps"] = float(steps if steps is not None else args.relearn_steps + 10)
    metrics["relearned"] = steps is not None
    return metrics


def run_dataset(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    clean, test = load(dataset, args)
    epochs = args.train_epochs[dataset]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in args.seeds:
        originals: dict[int, tuple[SmallCNN, float]] = {}  # one original per distinct training set
        for req_name, train, request, backdoor in requests(dataset, clean, seed, args.requests):
            if id(train) not in originals:
                pl.seed_everything(seed, verbose=False)
                model, t0 = SmallCNN(), time.perf_counter()
                fit(model, _AllData(train, args.batch_size, seed), epochs)
                originals[id(train)] = (model, time.perf_counter() - t0)
            original, train_s = originals[id(train)]
            dm = UnlearningDataModule(train, test, request, batch_size=args.batch_size, seed=seed, num_classes=10)
            original_metrics = evaluate_model(original, dm, seed=seed, max_samples=args.eval_samples, backdoor=backdoor)
            target = original_metrics["forget_acc"] - 0.02
            reference = None
            for name in args.methods:
                kw = dict(PARAMS.get(name, {}))
                result = run_method(LIBRARY_NAMES.get(name, name), original, dm, epochs=epochs if name == "retrain" else args.unlearn_epochs[dataset], seed=seed, **kw)
                row = evaluate_row(result.model, dm, reference, seed, args, target, backdoor)
                if name == "retrain":
                    reference = row
                    row["avg_gap"] = row["acc_gap"] = 0.0
                row.update(
                    dataset=dataset, request=req_name, seed=seed, method=name, params=kw,
                    seconds=result.timings_s.get("total"),
                    param_fraction=result.mask.fraction if result.mask is not None else None,
                )
                rows.append(row)
                print(f"[{dataset} seed {seed} {req_name}] {name}: forget {row['forget_acc']:.3f} remaining "
                      f"{row['remaining_acc']:.3f} gap {row.get('avg_gap', float('nan')):.2f} "
                      f"asr {row.get('backdoor_asr', float('nan')):.3f} ({row['seconds']:.1f}s)", flush=True)
            rows.append({**{k: v for k, v in original_metrics.items() if k != "per_class_test_acc"},
                         "dataset": dataset, "request": req_name, "seed": seed, "method": "(original)",
                         "seconds": train_s, "param_fraction": None})
    return {"dataset": dataset, "rows": rows, "elapsed_s": time.perf_counter() - start}


def _setup(res: dict[str, Any]) -> str:
    c, d = res["config"], res["dataset"]
    size = (f" MNIST is subsampled to fit a CPU budget: {c['mnist_train']} training and {c['mnist_test']} test "
            "images (fixed seeded subsets)." if d == "mnist" else "")
    params = "; ".join(f"{m} {PARAMS.get(m) or '-'}" for m in c["methods"])
    return (
        f"Command: `{res['command']}` ({res['elapsed_s'] / 60:.1f} min, {res['cpu_threads']} CPU thread(s)). "
        f"Seeds {c['seeds']}; original and retrained models trained {c['train_epochs'][d]} epochs, every other "
        f"method unlearns for {c['unlearn_epochs'][d]} epoch(s) from the same original.{size} Metrics on at most "
        f"{c['eval_samples']} seeded samples per split; relearn budget {c['relearn_steps']} steps. "
        f"Method parameters: {params}."
    )


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [SECTION, "", "Generated by `benchmarks/central.py` from `benchmarks/results/central_<dataset>.json`.", ""]
    lines += [
        "SmallCNN (2 conv + 2 linear layers), Adam lr 1e-3, batch 64. One original model per "
        "dataset and seed; per request the exact reference is retrained from scratch on the retain set and every "
        "method starts from the same original. Mean ± std over seeds. Accuracies, MIA-efficacy and AUC in %. "
        "forget acc is the forgotten class's test accuracy (class requests) or the accuracy on the forgotten "
        "training samples (sample requests); remaining acc is the other classes' test accuracy (class) or the "
        "retain-train accuracy (samples). MIA-eff is SalUn's SVC attack; the number in brackets is its shadow "
        "classifier's held-out accuracy, `!` when below 55% (members and non-members indistinguishable: the "
        "score is then uninformative). Avg. Gap is the mean |difference| to retrain over forget, remaining, test "
        "acc and MIA-eff, in points; the acc-only gap leaves MIA-eff out (it flips between 0 and 100 when the "
        "shadow classifier is at chance). Loss-attack AUC: forget samples vs held-out samples of the same "
        "classes (50 = no trace). Probe: logistic regression on penultimate features of half the (subsampled) "
        "test set, accuracy on the forgotten class in the other half. Relearn steps: Adam steps (batch 32, half "
        "forget, half retain) until forget acc is back within 2 points of the original's; budget + 10 means not "
        "within the budget. Backdoor ASR: share of triggered non-target test images classified as the "
        "trigger's target class (the backdoor run trains the original on 10% poisoned samples and forgets them). "
        "params updated: fraction of parameter elements the method may change. "
        "`(original)` is the model before unlearning (its time is training time). Times are wall-clock seconds "
        "on a 2-core machine shared with other jobs: compare them within a table only.",
        "",
        "Choices: the core method and both controls use capped gradient ascent (the best of random labels / "
        "ascent / lower forget weight in a one-seed MNIST check; random labels at full weight cost it 4 points "
        "of remaining accuracy). SSD uses alpha=100: the paper's alpha=10 left 15% remaining accuracy on digits "
        "(chosen on digits, seed 0; on MNIST it then dampens almost nothing). Findings and how to read them: "
        "[README, Evidence of forgetting](README.md#evidence-of-forgetting).",
        "",
    ]
    for res in results:
        kind = " (backdoor verification)" if res["config"]["requests"] == ["backdoor"] else ""
        lines += [f"### {res['dataset']}{kind}", "", _setup(res), ""]
        for req in dict.fromkeys(r["request"] for r in res["rows"]):
            stats = aggregate([r for r in res["rows"] if r["request"] == req])
            lines += [f"#### {res['dataset']}, forget {req}", ""]
            lines.append("| method | " + " | ".join(h for _, h in COLUMNS) + " |")
            lines.append("|---" * (len(COLUMNS) + 1) + "|")
            for method, cols in stats.items():
                cells = [format_cell(cols.get(k), k, cols.get("mia_shadow_acc")) for k, _ in COLUMNS]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) our section of BENCHMARKS.md, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "\n")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    p.add_argument("--mnist-root", default=None, help="folder with the MNIST idx .gz files")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=LABELS, choices=LABELS)
    p.add_argument("--requests", nargs="+", default=["class", "samples"], choices=["class", "samples", "backdoor"])
    p.add_argument("--digits-epochs", type=int, default=12)
    p.add_argument("--mnist-epochs", type=int, default=3)
    p.add_argument("--digits-unlearn-epochs", type=int, default=3)
    p.add_argument("--mnist-unlearn-epochs", type=int, default=1)
    p.add_argument("--mnist-train", type=int, default=6000)
    p.add_argument("--mnist-test", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--relearn-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--markdown", type=Path, default=None,
                   help="replace our section of this markdown file (default: render docs/benchmarks/central.md)")
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown section from the JSON on disk")
    p.add_argument("--smoke", action="store_true", help="digits, one seed, ours + retrain, class request, 1 epoch")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.seeds, args.methods, args.requests = ["digits"], [0], ["retrain", "ours"], ["class"]
        args.digits_epochs, args.digits_unlearn_epochs, args.eval_samples, args.relearn_steps = 2, 1, 300, 20
    if "retrain" in args.methods:  # the reference first: every other row is compared with it
        args.methods = ["retrain"] + [m for m in args.methods if m != "retrain"]
    if "mnist" in args.datasets and not args.mnist_root and not args.render_only:
        p.error("--mnist-root is required for the mnist dataset (the folder holding the idx .gz files)")
    args.train_epochs = {"digits": args.digits_epochs, "mnist": args.mnist_epochs}
    args.unlearn_epochs = {"digits": args.digits_unlearn_epochs, "mnist": args.mnist_unlearn_epochs}
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python benchmarks/central.py " + " ".join(argv if argv is not None else sys.argv[1:])
    suffix = "_smoke" if args.smoke else ""
    for dataset in [] if args.render_only else args.datasets:
        res = run_dataset(dataset, args)
        res.update(command=command, versions=library_versions(), cpu_threads=args.threads,
                   config={k: v for k, v in vars(args).items() if k not in ("out", "markdown")})
        args.out.mkdir(parents=True, exist_ok=True)
        part = "_backdoor" if args.requests == ["backdoor"] else ""
        (args.out / f"central_{dataset}{part}{suffix}.json").write_text(json.dumps(res, indent=1, default=str))
    # the section shows every result file on disk, so datasets (and the backdoor run) can be run separately
    files = [args.out / f"central_{d}{p}{suffix}.json" for d in ("digits", "mnist") for p in ("", "_backdoor")]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    if args.markdown is not None:
        write_section(args.markdown, markdown(results))
    elif not args.smoke:
        (ROOT / "docs" / "benchmarks" / "central.md").write_text(render_page(args.out))
    return results


PAGE_FILES = ["central_digits.json", "central_digits_backdoor.json", "central_mnist.json"]


def render_page(results: Path) -> str:
    """docs/benchmarks/central.md from the PAGE_FILES results."""
    import pagekit

    records = [pagekit.load(results, name) for name in PAGE_FILES]
    body = markdown(records).split("\n")
    body = body[4:]  # drop the section title and the line naming the old section's files
    text = "\n".join(body).replace("(README.md#evidence-of-forgetting)", "(../evidence.md)")
    machines = [pagekit.machine(r) + f"; {r.get('cpu_threads', 1)} torch thread(s)" for r in records]
    lines = pagekit.header("Centralised methods (digits, MNIST)", "central.py", PAGE_FILES,
                           [r["command"] for r in records], machines)
    return pagekit.finish(lines + text.splitlines())


if __name__ == "__main__":
    main()
