"""Core benchmark on MNIST: the demo table, GradientMask overhead per step, scoring cost per method.

    python benchmarks/core_mnist.py --data-root ../shared/data/mnist

Writes benchmarks/results/core_mnist.json; its page, docs/benchmarks/core_mnist.md, is rendered by render_page (benchmarks/render_all.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.scoring import SCORING_METHODS
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.scoring import channel_scores
from lightning_unlearn.mask import select_channels
from lightning_unlearn.callbacks import GradientMask
from lightning_unlearn.data import load_mnist
from lightning_unlearn.demo import run
from lightning_unlearn.mask import MaskEnforcer
from lightning_unlearn.models import SmallCNN


def demo_table(root: str, epochs: int, unlearn_steps: int, seed: int) -> tuple[list[dict], str]:
    results = run(root, epochs=epochs, config=UnlearnConfig(epochs=1, max_steps=unlearn_steps, seed=seed))
    rows, retrain_s = [], results["retrained"].timings_s["total"]
    lines = ["| model | forget acc (%) | remaining acc (%) | test acc (%) | params updated (%) | wall time (s) | vs retrain |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m, t = r.metrics, r.timings_s["total"]
        frac = None if r.mask is None else r.mask.fraction
        rows.append({"model": name, **{k: m[k] for k in ("forget_acc", "remaining_acc", "test_acc")},
                     "params_updated": frac, "wall_s": t})
        lines.append(f"| {name} | {100 * m['forget_acc']:.2f} | {100 * m['remaining_acc']:.2f} | {100 * m['test_acc']:.2f} | "
                     f"{'-' if frac is None else f'{100 * frac:.1f}'} | {t:.1f} | {100 * t / retrain_s:.1f}% |")
    return rows, "\n".join(lines)


def mask_overhead(dm: UnlearningDataModule, steps: int, repeats: int) -> dict:
    """Median time of one optimizer step with and without the mask (restore after step included)."""
    model = SmallCNN(channels=(32, 64), hidden=128)
    scores = channel_scores(model, dm.forget_dataloader(), "grad_x_act", max_samples=256)
    mask = select_channels(scores, model, ratio=0.1, head_rows=[3])
    batches = [b for _, b in zip(range(steps), dm.retain_dataloader(shuffle=True))]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def one_pass(enforcer):
        start = time.perf_counter()
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if enforcer:
                enforcer.zero_frozen_grads()
            opt.step()
            if enforcer:
                enforcer.restore()
        return (time.perf_counter() - start) / len(batches)

    enforcer = MaskEnforcer(model, mask)
    plain, masked = [], []
    one_pass(None)  # warm-up
    for _ in range(repeats):  # interleaved so background load hits both alike
        plain.append(one_pass(None))
        masked.append(one_pass(enforcer))
    p, m = statistics.median(plain), statistics.median(masked)
    # The mask's own work per step, timed alone: robust to background load, unlike the difference above.
    own = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            enforcer.zero_frozen_grads()
            enforcer.restore()
        own.append((time.perf_counter() - start) / steps)
    o = statistics.median(own)
    return {"plain_step_ms": 1e3 * p, "masked_step_ms": 1e3 * m, "end_to_end_overhead_pct": 100 * (m - p) / p,
            "mask_work_ms": 1e3 * o, "mask_work_pct_of_step": 100 * o / p, "steps": steps, "repeats": repeats,
            "mask_fraction": mask.fraction}


def scoring_cost(model, dm: UnlearningDataModule) -> dict:
    """Scoring wall time per method, relative to one training epoch over the forget data."""
    loader = dm.forget_dataloader()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    epoch = time.perf_counter() - start
    out = {"forget_samples": len(loader.dataset), "epoch_over_forget_s": epoch}
    for method in SCORING_METHODS:
        start = time.perf_counter()
        s = channel_scores(model, loader, method)
        elapsed = time.perf_counter() - start
        out[method] = {"seconds": elapsed, "relative_to_epoch": elapsed / epoch, "samples_scored": s.num_samples}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--unlearn-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/core_mnist.json")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    train, test = load_mnist(args.data_root)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[3]), batch_size=64)
    pl.seed_everything(args.seed, verbose=False)
    overhead = mask_overhead(dm, steps=100, repeats=5)
    print(f"GradientMask overhead: {overhead}", flush=True)
    rows, table = demo_table(args.data_root, args.epochs, args.unlearn_steps, args.seed)
    print(table, flush=True)
    trained = SmallCNN(channels=(32, 64), hidden=128)
    cost = scoring_cost(trained, dm)
    print(json.dumps(cost, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "table": rows, "table_md": table,
                                          "mask_overhead": overhead, "scoring_cost": cost, "torch_threads": torch.get_num_threads()}, indent=1))


def render_page(results: Path) -> str:
    """docs/benchmarks/core_mnist.md from core_mnist.json."""
    import pagekit

    rec = pagekit.load(results, "core_mnist.json")
    m, cost = rec["mask_overhead"], rec["scoring_cost"]
    intro = ("MNIST 60k/10k, SmallCNN with 32/64 conv channels and 128 hidden units, Adam lr 1e-3, batch 64. Original "
             "and retrained model: 3 epochs (the retrained one on the retain data only); unlearning: "
             "`SelectiveUnlearning` with grad x activation, top 10% channels per layer + the class-3 output row, "
             "random-label objective, 150 steps; fine-tune all: every parameter, retain data, the same 150 steps. "
             "Forget class 3. Wall times were taken while other jobs shared the machine: compare them within a table.")
    lines = pagekit.header("Core: the demo on MNIST, mask overhead, scoring cost", "core_mnist.py", ["core_mnist.json"],
                           [rec["command"]], [pagekit.machine(rec) + (f"; {rec['torch_threads']} torch threads"
                                                                       if "torch_threads" in rec else "")], intro)
    lines += ["## The demo table", "", rec["table_md"].strip(), "",
              "## Mask overhead per training step", "",
              f"AdamW, {100 * m['mask_fraction']:.1f}% of the parameters in the mask, {m['steps']} steps x "
              f"{m['repeats']} interleaved repeats: a plain step takes {m['plain_step_ms']:.1f} ms, a masked step "
              f"{m['masked_step_ms']:.1f} ms ({m['end_to_end_overhead_pct']:+.1f}%); the mask's own work (zero the "
              f"frozen gradients, write the frozen elements back) timed alone is {m['mask_work_ms']:.2f} ms = "
              f"{m['mask_work_pct_of_step']:.1f}% of a step.", "",
              "## Scoring time per method", "",
              f"Relative to one training epoch over the {cost['forget_samples']:,} forget samples "
              f"({cost['epoch_over_forget_s']:.1f} s); each method streams over the forget loader in eval mode. "
              "Perturbation methods (ablation, conductance) score a seeded subsample (`max_samples`).", ""]
    methods = [k for k, v in cost.items() if isinstance(v, dict)]
    lines += pagekit.table(["method", "samples scored", "seconds", "x one epoch over the forget data"],
                           [[k, f"{cost[k]['samples_scored']:,}", f"{cost[k]['seconds']:.1f}",
                             f"{cost[k]['relative_to_epoch']:.2f}"] for k in methods])
    return pagekit.finish(lines)


if __name__ == "__main__":
    main()
