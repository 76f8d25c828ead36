"""First look at "remove, then repair": relearn steps with and without resetting the selected channels.

One seed, digits, SmallCNN; explained (grad x activation) vs random channels at several ratios, each with
``reset="none"`` (fine-tune the selected slices) and ``reset="reinit"`` (re-initialise them first), the
same head row and budget. Relearn steps: Adam steps (half forget, half retain batches) until the forgotten
class's test accuracy is back within 2 points of the original's. Writes benchmarks/results/reset_digits.json.

    .venv/bin/python benchmarks/reset_digits.py
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_unlearn import ForgetRequest, UnlearnConfig, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.baselines.common import masked_update
from lightning_unlearn.baselines.controls import random_channel_mask
from lightning_unlearn.data import load_digits_datasets
from lightning_unlearn.evidence.evaluate import relearn_steps
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.models import SmallCNN

ROOT = Path(__file__).resolve().parents[1]


class _All(pl.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    p.add_argument("--epochs", type=int, default=12, help="training and retraining epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reset_digits.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = load_digits_datasets(seed=args.seed)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=64, seed=args.seed)
    pl.seed_everything(args.seed, verbose=False)
    model = SmallCNN()
    fit(model, _All(train), args.epochs)
    original = split_accuracies(model, dm)
    target = original["forget_acc"] - 0.02

    def relearn(m):
        return relearn_steps(m, dm, target, seed=args.seed)

    rows = []
    start = time.perf_counter()
    ref = retrain(model, dm, epochs=args.epochs, seed=args.seed)
    rows.append({"method": "retrain", **ref.metrics, "relearn_steps": relearn(ref.model), "seconds": ref.timings_s["total"]})
    for ratio in args.ratios:
        for reset in ("none", "reinit"):
            config = UnlearnConfig(ratio=ratio, reset=reset, seed=args.seed)
            ours = unlearn(model, dm, config)
            rows.append({"method": "explained", "ratio": ratio, "reset": reset, **ours.metrics,
                         "relearn_steps": relearn(ours.model), "params": ours.mask.fraction,
                         "seconds": ours.timings_s["total"]})
            mask = random_channel_mask(model, dm, ratio, seed=args.seed)
            rand = masked_update(model, dm, mask, "random_label", config.epochs, args.seed, reset=reset)
            rows.append({"method": "random", "ratio": ratio, "reset": reset, **rand.metrics,
                         "relearn_steps": relearn(rand.model), "params": mask.fraction,
                         "seconds": rand.timings_s["total"]})
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-2].items()
                   if k in ("method", "ratio", "reset", "forget_acc", "remaining_acc", "relearn_steps")}, flush=True)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()
                   if k in ("method", "ratio", "reset", "forget_acc", "remaining_acc", "relearn_steps")}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"original": original, "rows": rows, "elapsed_s": time.perf_counter() - start,
                                    "command": "python benchmarks/reset_digits.py"}, indent=2, default=float))
    print(f"retrain: relearn {rows[0]['relearn_steps']} steps; wrote {args.out}")


def render_page(results: Path) -> str:
    """docs/benchmarks/reset_digits.md from reset_digits.json."""
    import pagekit

    rec = pagekit.load(results, "reset_digits.json")
    o = rec["original"]
    intro = ("Does removing the selected channels before the masked repair make the forgotten class as slow to "
             "relearn as after retraining? SmallCNN on digits, class 3, seed 0; explained (grad x activation) vs "
             "random channels at several ratios, each with `reset=\"none\"` (repair the selected slices as they are) "
             "and `reset=\"reinit\"` (re-initialise them first), the same head row and budget. Relearn steps: Adam "
             "steps (half forget, half retain batches) until the forgotten class's test accuracy is back within 2 "
             f"points of the original's ({pagekit.pct(o['forget_acc'])}%). These runs predate the current "
             "defaults (see [Forgetting at the defaults](forgetting.md)); times are not comparable (loaded machine).")
    lines = pagekit.header("Remove, then repair: a first look (digits, one seed)", "reset_digits.py",
                           ["reset_digits.json"], [rec["command"]], [pagekit.machine(rec)], intro)
    rows = []
    for r in rec["rows"]:
        ref = r["method"] == "retrain"
        rows.append(["retrain (reference)" if ref else r["method"], r.get("ratio", "-"), r.get("reset", "-"),
                     pagekit.pct(r["forget_acc"]), pagekit.pct(r["remaining_acc"]), pagekit.pct(r["test_acc"]),
                     r["relearn_steps"], "100" if ref else f"{100 * r['params']:.1f}", f"{r['seconds']:.1f}"])
    lines += pagekit.table(["channels", "ratio", "reset", "forget acc %", "remaining acc %", "test acc %",
                            "relearn steps", "% params", "time (s)"], rows)
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
