"""Full MNIST: the default procedure against retraining, with the reset alternatives, in one process.

``--arch`` (benchmarks/architectures.py; default SmallCNN) trained on all 60,000 images for ``--epochs``; class 3 forgotten; retraining from scratch on the
retain data for the same epochs is the reference (its wall time is the denominator of the speed ratio).
Then ``unlearn`` with the library's defaults and with each ``--variants`` override (JSON objects of
UnlearnConfig fields). Relearn steps: Adam steps until class 3 is back within 2 points of the original.
Writes benchmarks/results/full_mnist_default.json (``full_mnist_default_<arch>.json`` for other architectures).

    .venv/bin/python benchmarks/full_mnist_default.py --data-root ../shared/data/mnist
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_unlearn import ForgetRequest, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._io import write_json
from lightning_unlearn._training import fit
from lightning_unlearn.data import load_mnist
from lightning_unlearn.evidence.evaluate import relearn_steps
from lightning_unlearn.metrics import split_accuracies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("forget_acc", "remaining_acc", "test_acc")


class _All(pl.LightningDataModule):
    def __init__(self, dataset, seed: int) -> None:
        super().__init__()
        self.dataset, self.seed = dataset, seed

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(self.seed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder with the MNIST idx .gz files")
    p.add_argument("--epochs", type=int, default=2, help="training and retraining epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=list(ARCHITECTURES), default="SmallCNN")
    p.add_argument("--variants", nargs="*", default=['{"reset": "reinit"}'], help="UnlearnConfig overrides (JSON)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    suffix = "" if args.arch == "SmallCNN" else f"_{args.arch}"
    args.out = args.out or ROOT / "benchmarks" / "results" / f"full_mnist_default{suffix}.json"
    overrides = [json.loads(v) for v in args.variants]
    torch.set_num_threads(1)
    train, test = load_mnist(args.data_root)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=64, seed=args.seed)
    pl.seed_everything(args.seed, verbose=False)
    model = build(args.arch, image_size=28, epochs=args.epochs)
    start = time.perf_counter()
    fit(model, _All(train, args.seed), args.epochs)
    rows = [{"model": "original", **{k: split_accuracies(model, dm)[k] for k in KEYS},
             "seconds": time.perf_counter() - start}]
    target = rows[0]["forget_acc"] - 0.02
    start = time.perf_counter()
    reference = retrain(model, dm, args.epochs, seed=args.seed)
    retrain_s = time.perf_counter() - start
    rows.append({"model": "retrain", **{k: reference.metrics[k] for k in KEYS}, "seconds": retrain_s,
                 "relearn_steps": relearn_steps(reference.model, dm, target, seed=args.seed)})
    for over in [{}, *overrides]:
        start = time.perf_counter()
        result = unlearn(model, dm, **over)
        seconds = time.perf_counter() - start
        rows.append({"model": "unlearn " + (json.dumps(over) if over else "(defaults)"),
                     **{k: result.metrics[k] for k in KEYS}, "seconds": seconds, "ratio_to_retrain": seconds / retrain_s,
                     "steps": result.extra["steps"], "stop_reason": result.extra["stop_reason"],
                     "timings_s": result.timings_s, "reset": result.config.reset,
                     "relearn_steps": relearn_steps(result.model, dm, target, seed=args.seed)})
        print(rows[-1], flush=True)
    write_json({"arch": args.arch, "epochs": args.epochs, "seed": args.seed, "rows": rows}, args.out)
    print("| model | forget % | remaining % | test % | relearn steps | repair steps (stop) | time (s) | / retrain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        stop = f"{r['steps']} ({r['stop_reason']})" if "steps" in r else "-"
        ratio = f"{r['ratio_to_retrain']:.3f}" if "ratio_to_retrain" in r else "-"
        print(f"| {r['model']} | {100 * r['forget_acc']:.2f} | {100 * r['remaining_acc']:.2f} | {100 * r['test_acc']:.2f} | "
              f"{r.get('relearn_steps', '-')} | {stop} | {r['seconds']:.1f} | {ratio} |")


PAGE_FILES = [  # (results file, the command that wrote it: the files do not record it)
    ("full_mnist_default.json", "python benchmarks/full_mnist_default.py --data-root ../shared/data/mnist --variants "
                                "'{\"reset\": \"reinit\"}' '{\"reset\": \"none\"}' '{\"objective\": \"retain\"}'"),
    ("full_mnist_default_MLP.json", "python benchmarks/full_mnist_default.py --data-root ../shared/data/mnist --arch MLP"),
    ("full_mnist_default_ResNetBN.json",
     "python benchmarks/full_mnist_default.py --data-root ../shared/data/mnist --arch ResNetBN"),
]


def render_page(results: Path) -> str:
    """docs/benchmarks/full_mnist_default.md from the PAGE_FILES results."""
    import pagekit

    records = {name: pagekit.load(results, name) for name, _ in PAGE_FILES}
    intro = ("Full MNIST (60,000 training / 10,000 test images), class 3 forgotten, seed 0: the library's defaults "
             "(`unlearn (defaults)`) and reset/objective variants against retraining from scratch on the retain data "
             "for the same epochs in the same process (the speed reference, `/ retrain`). Accuracies in %; relearn "
             "steps: Adam steps until class 3 is back within 2 points of the original; repair steps with the stopping "
             "rule's reason. One torch thread. The commands listed are those documented when the files were written "
             "(the files record epochs and seed, not the command line).")
    lines = pagekit.header("Full MNIST at the previous defaults (dampen)", "full_mnist_default.py", records,
                           [cmd for _, cmd in PAGE_FILES], [pagekit.UNKNOWN_MACHINE], intro)
    for name, _ in PAGE_FILES:
        rec = records[name]
        arch = rec.get("arch", "SmallCNN")
        lines += [f"## {arch}", "", f"`{name}`: {rec['epochs']} training epochs, seed {rec['seed']}.", ""]
        rows = []
        for r in rec["rows"]:
            steps = f"{r['steps']} ({r['stop_reason']})" if "steps" in r else "-"
            ratio = f"{r['ratio_to_retrain']:.3f}" if "ratio_to_retrain" in r else "-"
            rows.append([r["model"], *(f"{100 * r[k]:.2f}" for k in KEYS), r.get("relearn_steps", "-"), steps,
                         f"{r['seconds']:.1f}", ratio])
        lines += pagekit.table(["model", "forget %", "remaining %", "test %", "relearn steps", "repair steps (stop)",
                                "time (s)", "/ retrain"], rows) + [""]
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
