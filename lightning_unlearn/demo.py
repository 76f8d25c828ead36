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

from lightning_unlearn import ForgetRequest, retrain, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.result import UnlearningResult
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data import load_digits_datasets, load_mnist
from lightning_unlearn.metrics import split_accuracies
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.mask import ParameterMask


class _AllTrainData(pl.LightningDataModule):
    def __init__(self, dataset, batch_size: int):
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def run(
    data_root: str | None = None,
    epochs: int = 20,
    forget_class: int = 3,
    config: UnlearnConfig | None = None,
    batch_size: int = 64,
) -> dict[str, UnlearningResult]:
    """The demo on digits (default) or MNIST (``data_root``): see :func:`compare_with_references`."""
    config = config or UnlearnConfig()
    model, dm = demo_setup(data_root, forget_class, config, batch_size)
    return compare_with_references(model, dm, epochs, config)


def demo_setup(
    data_root: str | None, forget_class: int, config: UnlearnConfig, batch_size: int = 64,
) -> tuple[pl.LightningModule, UnlearningDataModule]:
    """The demo's untrained model and its data (digits, or MNIST from ``data_root``), seeded with ``config.seed``."""
    train, test = load_mnist(data_root) if data_root else load_digits_datasets(seed=config.seed)
    dm = UnlearningDataModule(train, test, ForgetRequest(classes=[forget_class]), batch_size=batch_size, seed=config.seed)
    pl.seed_everything(config.seed, verbose=False)
    return (SmallCNN(channels=(32, 64), hidden=128) if data_root else SmallCNN()), dm


def compare_with_references(
    model: pl.LightningModule, dm: UnlearningDataModule, epochs: int = 20, config: UnlearnConfig | None = None,
) -> dict[str, UnlearningResult]:
    """Train ``model`` on all data, then: unlearn, retrain from scratch (reference), fine-tune all (control).

    The fine-tune-all control gets as many optimizer steps on the retain data as the unlearning took.
    """
    config = config or UnlearnConfig()
    start = time.perf_counter()
    fit(model, _AllTrainData(dm.train_dataset, dm.batch_size), epochs)
    results = {"original": UnlearningResult(model, None, split_accuracies(model, dm), {"total": time.perf_counter() - start})}
    # the head calibration follows the original's schedule, which is known here
    known = {"calibrate_epochs": epochs} if config.calibrate_epochs == "auto" else {}
    results["unlearned"] = unlearn(model, dm, config, **known)
    results["retrained"] = retrain(model, dm, epochs=epochs, seed=config.seed)

    tuned = copy.deepcopy(model).train()
    start = time.perf_counter()
    steps = results["unlearned"].extra["steps"]  # same steps, every parameter trainable, retain data only
    fit(tuned, dm, None, trainer_kwargs={"max_steps": max(steps, 1)})
    results["fine-tune all"] = UnlearningResult(
        tuned, ParameterMask.full(tuned), split_accuracies(tuned, dm), {"total": time.perf_counter() - start},
        method="finetune",
    )
    add_relearn_steps(results, dm, config.seed)
    return results


#: The attack verdict's defaults: population size and the most seconds it may take (estimated first).
ATTACK_MODELS = 6
ATTACK_LIMIT_S = 60.0


def attack_verdict(
    results: dict[str, UnlearningResult], dm: UnlearningDataModule, epochs: int, config: UnlearnConfig,
    models: int = ATTACK_MODELS, limit_s: float = ATTACK_LIMIT_S,
) -> str:
    """One line: the U-LiRA verdict on ``models`` originals / unlearned / retrained (the demo's own are the first),
    or why it was skipped. The cost is estimated from the retraining and the unlearning the demo timed."""
    from lightning_unlearn.evidence.verdict import population_verdict, verdict_cost

    import numpy as np

    forget_classes = np.unique(np.asarray(dm.train_targets)[dm.forget_indices])
    missing = sorted(set(forget_classes.tolist()) - set(np.asarray(dm.test_targets).tolist()))
    if missing:
        return (f"attack verdict skipped: the test set has no samples of class(es) {missing} to calibrate the "
                "forget samples against")
    retrain_s, unlearn_s = results["retrained"].timings_s["total"], results["unlearned"].timings_s["total"]
    estimate = verdict_cost(models, retrain_s, unlearn_s)
    if estimate > limit_s:
        return (f"attack verdict skipped: K={models} populations need {2 * (models - 1)} more trainings, about "
                f"{estimate:.0f}s at this retraining's {retrain_s:.1f}s, over the {limit_s:.0f}s limit "
                f"(raise the attack limit or lower K to run it)")
    known = {"calibrate_epochs": epochs} if config.calibrate_epochs == "auto" else {}
    verdict = population_verdict(results["original"].model, results["unlearned"].model, results["retrained"].model,
                                 dm, epochs, lambda m: unlearn(m, dm, config, **known).model, models, config.seed)
    return verdict.line()


def add_relearn_steps(results: dict[str, UnlearningResult], dm: UnlearningDataModule, seed: int = 0) -> None:
    """Relearn steps of every model but the original, into ``result.extra``: a model that only hides the
    class relearns it faster than the retrained one (Adam steps, half forget / half retain batches, until
    the forget accuracy is back within 2 points of the original's)."""
    from lightning_unlearn.evidence.evaluate import relearn_steps

    target = results["original"].metrics["forget_acc"] - 0.02
    for name, result in results.items():
        if name != "original":
            result.extra["relearn_steps"] = relearn_steps(result.model, dm, target, seed=seed)


def print_table(results: dict[str, UnlearningResult], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    columns = ("model", "forget acc (%)", "remaining acc (%)", "test acc (%)", "relearn steps", "params updated (%)",
               "wall time (s)")
    for col in columns:
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, r in results.items():
        m = r.metrics
        updated = "-" if r.mask is None else f"{100 * r.mask.fraction:.1f}"
        steps = r.extra.get("relearn_steps", "-")
        table.add_row(
            name, f"{100 * m['forget_acc']:.1f}", f"{100 * m['remaining_acc']:.1f}", f"{100 * m['test_acc']:.1f}",
            "> 200" if steps is None else str(steps), updated, f"{r.timings_s['total']:.2f}",
        )
    (console or Console(width=130)).print(table)
    print("relearn steps: Adam steps until the forgotten data is back to the original's accuracy; fewer than the "
          "retrained model's means the unlearned model hid what it knew rather than forgot it")


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _steps(text: str) -> int | str:
    """``--max-steps``: an integer or ``auto``."""
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="MNIST folder (idx .gz files); default: embedded digits")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of the original and retrained model")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--attack", action=argparse.BooleanOptionalAction, default=True,
                        help="print the U-LiRA verdict on a small population (skipped when estimated too slow)")
    parser.add_argument("--attack-models", type=_at_least(3), default=ATTACK_MODELS,
                        help="K: originals, unlearned and retrained models per population for the verdict")
    parser.add_argument("--attack-limit-s", type=float, default=ATTACK_LIMIT_S,
                        help="skip the verdict when its estimated cost is above this many seconds")
    defaults = UnlearnConfig()
    for name in ("method", "ratio", "epochs", "max_steps", "seed"):
        kind = _steps if name == "max_steps" else type(getattr(defaults, name)) if getattr(defaults, name) is not None else int
        flags = {"epochs": ["--unlearn-epochs"], "max_steps": ["--max-steps", "--unlearn-steps"]}.get(
            name, ["--" + name.replace("_", "-")])
        parser.add_argument(*flags, dest=f"cfg_{name}", type=kind, default=getattr(defaults, name),
                            help=f"UnlearnConfig.{name}")
    args = parser.parse_args(argv)
    config = UnlearnConfig.build(**{k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")})
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    model, dm = demo_setup(args.data_root, args.forget_class, config)
    results = compare_with_references(model, dm, args.epochs, config)
    data = "MNIST" if args.data_root else "digits"
    print_table(results, f"Forget class {args.forget_class} on {data} ({config.method}, ratio {config.ratio})")
    print_speed(results)
    if args.attack:
        print(attack_verdict(results, dm, args.epochs, config, args.attack_models, args.attack_limit_s))
    print(f"whole demo: {time.perf_counter() - start:.1f}s")


def print_speed(results: dict[str, UnlearningResult]) -> None:
    unlearned = results["unlearned"]
    u, r = unlearned.timings_s["total"], results["retrained"].timings_s["total"]
    steps, reason = unlearned.extra.get("steps"), unlearned.extra.get("stop_reason")
    repair = f" (reset {unlearned.config.reset}, repair stopped after {steps} steps: {reason})" if steps is not None else ""
    print(f"unlearning took {u:.2f}s = {100 * u / r:.1f}% of retraining ({r:.2f}s){repair}")


if __name__ == "__main__":
    main()
