"""Smoke check of the SUPREME adapters: each peer runs on a small digits model and changes it.

Trains one model (the population harness's architectures, a short schedule), then runs every peer in
``supreme_methods.PEERS`` on a fresh copy for a class request and a 100-sample request, and prints
forget / test accuracy before and after, the seconds taken and the share of parameters changed. Fails
(exit 1) if a peer raises unexpectedly or returns a model with no changed weight. Peers' environment only:

    OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/peers/smoke.py [--arch SmallCNN] [--epochs 10]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: population_task, population, architectures
sys.path.insert(0, str(HERE))

from population import ARCHS, DATASETS, make_request, make_task, recipe_of, train_plain  # noqa: E402
from population_task import load_plugin  # noqa: E402

from lightning_unlearn.data import UnlearningDataModule  # noqa: E402
from lightning_unlearn.data import load_digits_datasets  # noqa: E402


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset) -> float:
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return float((model(x).argmax(1) == y).float().mean())


def changed_share(before: torch.nn.Module, after: torch.nn.Module) -> float:
    total = changed = 0
    for (_, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        total += a.numel()
        changed += int((a != b).sum())
    return changed / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="SmallCNN", choices=list(ARCHS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--peers", nargs="+", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    peers = load_plugin(HERE / "supreme_methods.py")
    names = args.peers or list(peers)
    unknown = [n for n in names if n not in peers]
    if unknown:
        p.error(f"unknown peers {unknown}; allowed are {sorted(peers)}")
    spec = DATASETS["digits"]
    train, test = load_digits_datasets(seed=0)
    model = train_plain(ARCHS[args.arch](num_classes=10, image_size=8, epochs=args.epochs), train, args.epochs,
                        spec.batch_size, seed=0)
    failures = []
    for req_name in ("class3", "samples100"):
        request = make_request(req_name, len(train))
        dm = UnlearningDataModule(train, test, request, batch_size=spec.batch_size, seed=0, num_classes=10)
        recipe = recipe_of(model, spec, args.arch, len(train), args.epochs)
        forget_eval = (torch.utils.data.Subset(test, dm.forget_test_indices.tolist()) if request.kind == "class"
                       else dm.forget_set)
        print(f"{args.arch} {req_name}: original forget {accuracy(model, forget_eval):.3f} "
              f"test {accuracy(model, test):.3f}", flush=True)
        for name in names:
            task = make_task(copy.deepcopy(model), train, test, request, spec, recipe, seed=7)
            t0 = time.perf_counter()
            try:
                out = peers[name](task)
            except ValueError as err:  # a request the peer does not support (UNSIR on samples)
                print(f"  {name}: not applicable: {err}", flush=True)
                continue
            except Exception as err:  # noqa: BLE001
                failures.append(f"{name} {req_name}: {type(err).__name__}: {err}")
                print(f"  {name}: FAILED {type(err).__name__}: {err}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            share = changed_share(model, out)
            print(f"  {name}: forget {accuracy(out, forget_eval):.3f} test {accuracy(out, test):.3f} "
                  f"changed {100 * share:.1f}% of weights, {seconds:.2f}s", flush=True)
            if not np.isfinite(share) or share == 0:
                failures.append(f"{name} {req_name}: no weight changed")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
