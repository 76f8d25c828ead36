"""`make demo`: train on digits, forget class 3, compare with retraining and a fine-tune-all control.

Run: ``python -m lightning_unlearn.demo [--data-root MNIST_DIR] [--epochs N] [--forget-class C]``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from lightning_unlearn import ForgetRequest, UnlearningDataModule, retrain, unlearn
from lightning_unlearn.api import UnlearningResult, fit
from lightning_unlearn.data import load_digits_datasets, load_mnist
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.selection import ParameterMask


class _AllTrainData(pl.LightningDataModule):
    def __init__(self, dataset, batch_size: int):
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def run(
    data_root: str | None = None,
    epochs: int = 20,
    unlearn_epochs: int = 2,
    unlearn_steps: int | None = None,
    forget_class: int = 3,
    method: str = "grad_x_act",
    ratio: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, UnlearningResult]:
    """The demo on digits (default) or MNIST (``data_root``): see :func:`compare_with_references`."""
    train, test = load_mnist(data_root) if data_root else load_digits_datasets(seed=seed)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[forget_class]), batch_size=batch_size, seed=seed)
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN(channels=(32, 64), hidden=128) if data_root else SmallCNN()
    return compare_with_references(model, dm, epochs, unlearn_epochs, unlearn_steps, method, ratio, seed)


def compare_with_references(
    model: pl.LightningModule,
    dm: UnlearningDataModule,
    epochs: int = 20,
    unlearn_epochs: int = 2,
    unlearn_steps: int | None = None,
    method: str = "grad_x_act",
    ratio: float = 0.1,
    seed: int = 0,
) -> dict[str, UnlearningResult]:
    """Train ``model`` on all data, then: unlearn, retrain from scratch (reference), fine-tune all (control)."""
    start = time.perf_counter()
    fit(model, _AllTrainData(dm.train_dataset, dm.batch_size), epochs)
    results = {"original": UnlearningResult(model, None, split_accuracies(model, dm), {"total": time.perf_counter() - start})}
    results["unlearned"] = unlearn(
        model, dm, method=method, ratio=ratio, epochs=unlearn_epochs, max_steps=unlearn_steps, seed=seed
    )
    results["retrained"] = retrain(model, dm, epochs=epochs, seed=seed)

    tuned = copy.deepcopy(model).train()
    start = time.perf_counter()
    budget = {"max_steps": unlearn_steps} if unlearn_steps else {}
    fit(tuned, dm, unlearn_epochs, trainer_kwargs=budget)  # same budget, every parameter trainable, retain data only
    results["fine-tune all"] = UnlearningResult(
        tuned, ParameterMask.full(tuned), split_accuracies(tuned, dm), {"total": time.perf_counter() - start}
    )
    return results


def print_table(results: dict[str, UnlearningResult], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("model", "forget acc (%)", "remaining acc (%)", "test acc (%)", "params updated (%)", "wall time (s)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in results.items():
        m = r.metrics
        updated = "-" if r.mask is None else f"{100 * r.mask.fraction:.1f}"
        table.add_row(
            name, f"{100 * m['forget_acc']:.1f}", f"{100 * m['remaining_acc']:.1f}", f"{100 * m['test_acc']:.1f}",
            updated, f"{r.timings_s['total']:.2f}",
        )
    (console or Console(width=120)).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="MNIST folder (idx .gz files); default: embedded digits")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the original and retrained model")
    parser.add_argument("--unlearn-epochs", type=int, default=2)
    parser.add_argument("--unlearn-steps", type=int, default=None, help="cap on unlearning optimizer steps")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--method", default="grad_x_act")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    results = run(
        args.data_root, args.epochs, args.unlearn_epochs, args.unlearn_steps, args.forget_class, args.method, args.ratio,
        seed=args.seed,
    )
    data = "MNIST" if args.data_root else "digits"
    print_table(results, f"Forget class {args.forget_class} on {data} ({args.method}, ratio {args.ratio})")
    print_speed(results)
    print(f"whole demo: {time.perf_counter() - start:.1f}s")


def print_speed(results: dict[str, UnlearningResult]) -> None:
    u, r = results["unlearned"].timings_s["total"], results["retrained"].timings_s["total"]
    print(f"unlearning took {u:.2f}s = {100 * u / r:.1f}% of retraining ({r:.2f}s)")


if __name__ == "__main__":
    main()
