"""Fixed costs of one ``unlearn()`` call on small data: the digits MLP (benchmarks/architectures.py), class 3 and
100 samples, the library defaults.

Trains the original once (cached under ``outputs/fixed_cost``), then runs ``unlearn()`` ``--repeat`` times per
request in one single-threaded process and prints each call's CPU seconds and a SHA-256 of the unlearned
parameters and buffers (the same seed must give the same bytes whatever this module's version), or profiles the
calls with cProfile.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_fixed_cost.py --repeat 5 --retrain
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_fixed_cost.py --profile --requests class3
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import MLP  # noqa: E402

from lightning_unlearn import ForgetRequest, unlearn  # noqa: E402
from lightning_unlearn._training import quiet_lightning, reinitialize  # noqa: E402
from lightning_unlearn.data import UnlearningDataModule, load_digits_datasets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, BATCH = 30, 64  # the population benchmark's digits schedule


def train_plain(model: MLP, dataset, seed: int) -> float:
    """CPU seconds of retraining ``model`` from scratch on ``dataset`` with the original's schedule (plain loop, as
    benchmarks/population.py times it)."""
    c0 = time.process_time()
    reinitialize(model, seed).train()
    opt = model.configure_optimizers()
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y.long()).backward()
            opt.step()
    return time.process_time() - c0


def original(train, cache: Path) -> MLP:
    """The digits MLP trained on all training data (plain loop, SGD from its configure_optimizers), cached."""
    model = MLP()
    path = cache / "digits_mlp_original.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    reinitialize(model, 0).train()
    opt = model.configure_optimizers()
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y.long()).backward()
            opt.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def request(name: str, n_train: int) -> ForgetRequest:
    if name == "class3":
        return ForgetRequest(classes=[3])
    rng = np.random.default_rng(0)
    return ForgetRequest(sample_ids=sorted(rng.choice(n_train, size=100, replace=False).tolist()))


def digest(result) -> str:
    """SHA-256 of the unlearned parameters and buffers, the stopping rule's checks and the accuracies."""
    h = hashlib.sha256()
    for name, t in sorted(result.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([result.extra["stopping"], result.metrics, result.extra["steps"]], sort_keys=True).encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", nargs="+", default=["class3", "samples100"], choices=["class3", "samples100"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile the calls; print the top functions")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--retrain", action="store_true", help="also time one retraining per request (same process)")
    p.add_argument("--cache", default=str(ROOT / "outputs" / "fixed_cost"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    train, test = load_digits_datasets(seed=0)
    model = original(train, Path(args.cache))
    profiler = cProfile.Profile() if args.profile else None
    with quiet_lightning():
        for name in args.requests:
            dm = UnlearningDataModule(train, test, request(name, len(train)), batch_size=BATCH, seed=0, num_classes=10)
            for i in range(args.repeat):
                torch.manual_seed(0)
                c0 = time.process_time()
                if profiler:
                    profiler.enable()
                result = unlearn(model, dm)
                if profiler:
                    profiler.disable()
                seconds = time.process_time() - c0
                print(f"{name} run {i}: {seconds:.3f} CPU s, {result.extra['steps']} steps "
                      f"({result.extra['stop_reason']}), forget {result.metrics['forget_acc']:.3f}, "
                      f"sha256 {digest(result)}", flush=True)
            if args.retrain:
                print(f"{name} retraining: {train_plain(MLP(), dm.retain_set, 12345):.3f} CPU s", flush=True)
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
