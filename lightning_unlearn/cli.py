"""``lightning-unlearn fit | validate | test | unlearn | evaluate --config ...`` (LightningCLI).

``unlearn`` and ``evaluate`` are methods of :class:`UnlearningTrainer`, so their signatures and
docstrings become the command-line options and help, exactly like ``fit``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from lightning_unlearn.api import UnlearningResult, retrain
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.metrics import split_accuracies

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, MisconfigurationException)


class UnlearningTrainer(pl.Trainer):
    """A Lightning Trainer with two more entry points: :meth:`unlearn` and :meth:`evaluate`."""

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: UnlearningDataModule,
        ckpt_path: str,
        method: str = "grad_x_act",
        ratio: float = 0.1,
        objective: str = "auto",
        epochs: int = 2,
        scope: str = "layer",
        contrast: bool = False,
        max_samples: int | None = None,
        output_dir: str | None = None,
        relearn: bool = False,
    ) -> Path:
        """Forget the data module's request in a trained checkpoint; write the unlearned checkpoint and its report.

        Args:
            ckpt_path: the trained checkpoint (read only, never overwritten).
            method: channel scoring method: grad_x_act, ablation, gradcam, conductance, weight_saliency.
            ratio: fraction of channels per layer to update, in (0, 1].
            objective: random_label, ascent, retain or auto (random_label centrally; in federated runs the
                protocol's choice: retain data with a 10x learning rate on the forgotten head rows).
            epochs: unlearning epochs.
            scope: layer (top ratio per layer) or global.
            contrast: score forget importance relative to retain importance.
            max_samples: score a seeded subsample of the forget set of this size.
            output_dir: where to write ``<name>-unlearned.ckpt``, the mask, the report and plots
                (default: next to ``ckpt_path``). Existing files get a ``-N`` suffix.
            relearn: also measure relearn time in the report (slower).
        """
        source = _existing(ckpt_path)
        _load_weights(model, source)
        original = copy.deepcopy(model)
        objective = "random_label" if objective == "auto" else objective
        callback = SelectiveUnlearning(method=method, ratio=ratio, objective=objective, scope=scope,
                                       contrast=contrast, max_samples=max_samples, seed=_seed())
        # never let a ModelCheckpoint from the training config write over the input
        self.callbacks = [c for c in self.callbacks if not isinstance(c, Checkpoint)] + [callback]
        self.fit_loop.max_epochs = epochs
        datamodule.train_on = "retain"
        start = time.perf_counter()
        self.fit(model, datamodule=datamodule)
        timings = {**callback.timings, "total": time.perf_counter() - start}
        out_dir = Path(output_dir) if output_dir else source.parent
        target = self._save_new_checkpoint(out_dir / f"{source.name.split('.')[0]}-unlearned.ckpt")
        if not self.is_global_zero:
            return target
        from lightning_unlearn.evaluation import write_report

        result = UnlearningResult(model, callback.mask, split_accuracies(model, datamodule), timings, callback.scores)
        params = dict(ratio=ratio, objective=objective, epochs=epochs, scope=scope, contrast=contrast,
                      max_samples=max_samples, source_checkpoint=str(source), lightning_checkpoint=str(target))
        report, path = write_report(out_dir, original, result, datamodule, method, params, _seed(), relearn=relearn)
        _print_summary(report.metrics, report.mask["fraction"], timings)
        print(f"unlearned checkpoint: {target}\nreport: {path}")
        return target

    def evaluate(
        self,
        model: pl.LightningModule,
        datamodule: UnlearningDataModule,
        ckpt_path: str,
        unlearned_path: str,
        retrained_path: str | None = None,
        retrain_epochs: int | None = None,
        output_dir: str | None = None,
        relearn: bool = True,
    ) -> Path:
        """Compare original, unlearned and retrained models: print the table, write plots and a JSON.

        Args:
            ckpt_path: the original trained checkpoint.
            unlearned_path: the checkpoint written by ``lightning-unlearn unlearn``.
            retrained_path: a retrained reference checkpoint; if absent one is retrained from scratch on
                the retain data for ``retain_epochs`` (default: ``trainer.max_epochs``).
            output_dir: where to write ``evaluation.json`` and plots (default: next to ``unlearned_path``).
            relearn: measure relearn time (fine-tuning steps to recover forget accuracy).
        """
        original = _load_weights(copy.deepcopy(model), _existing(ckpt_path))
        unlearned = _load_weights(copy.deepcopy(model), _existing(unlearned_path))
        timings = {}
        if retrained_path:
            retrained = _load_weights(copy.deepcopy(model), _existing(retrained_path))
        else:
            ref = retrain(original, datamodule, epochs=retrain_epochs or self.max_epochs or 10, seed=_seed())
            retrained, timings["retrain"] = ref.model, ref.timings_s["retrain"]
        out_dir = Path(output_dir) if output_dir else Path(unlearned_path).parent
        return write_evaluation(original, unlearned, retrained, datamodule, out_dir, relearn,
                                {"original": str(ckpt_path), "unlearned": str(unlearned_path), "timings_s": timings})

    def demo(
        self,
        model: pl.LightningModule,
        datamodule: UnlearningDataModule,
        method: str = "grad_x_act",
        ratio: float = 0.1,
        unlearn_epochs: int = 2,
        unlearn_steps: int | None = None,
    ) -> None:
        """Train, unlearn, retrain and fine-tune-all in one go and print the comparison table.

        Args:
            method: channel scoring method.
            ratio: fraction of channels per layer to update.
            unlearn_epochs: epochs of unlearning and of the fine-tune-all control
                (training and retraining use ``trainer.max_epochs``).
            unlearn_steps: cap on unlearning optimizer steps.
        """
        import logging
        import warnings

        from lightning_unlearn.demo import compare_with_references, print_speed, print_table

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        results = compare_with_references(model, datamodule, self.max_epochs or 20, unlearn_epochs, unlearn_steps,
                                          method, ratio, _seed())
        print_table(results, f"Forget {datamodule.request.to_dict()} ({method}, ratio {ratio})")
        print_speed(results)

    def _save_new_checkpoint(self, wanted: Path) -> Path:
        """Write a Lightning checkpoint to a fresh path atomically (temporary file + link)."""
        from lightning_unlearn.evaluation.report import unique_path

        target = Path(self.strategy.broadcast(str(unique_path(wanted)) if self.is_global_zero else None))
        tmp = target.with_name(target.name + ".tmp")
        self.save_checkpoint(tmp)
        if self.is_global_zero:
            os.link(tmp, target)
            os.unlink(tmp)
        self.strategy.barrier()
        return target


def write_evaluation(original, unlearned, retrained, dm: UnlearningDataModule, out_dir: Path, relearn: bool,
                     extra: dict) -> Path:
    """Evaluate the three models, print the comparison table, write the per-class plot and ``evaluation.json``."""
    from lightning_unlearn.evaluation import compare, evaluate_unlearning, plot_per_class_accuracy
    from lightning_unlearn.evaluation.report import _atomic_write, _jsonable, unique_path

    evaluation = evaluate_unlearning(original, unlearned, dm, retrained, seed=_seed(), relearn=relearn)
    rows = [{"method": name, **evaluation[name]} for name in ("original", "unlearned", "retrained")]
    rows[1].update(evaluation["comparison"])
    compare(rows, title=f"request {dm.request.to_dict()}", console=_console())
    per_class = {k: evaluation[k]["per_class_test_acc"] for k in ("original", "unlearned", "retrained")}
    plot = plot_per_class_accuracy(per_class, out_dir / "evaluation.per_class.png", dm.request.classes)
    payload = {"request": dm.request.to_dict(), **extra, "metrics": evaluation, "plots": [str(plot)]}
    path = _atomic_write(unique_path(out_dir / "evaluation.json"),
                         lambda f: f.write(json.dumps(payload, indent=2, default=_jsonable).encode()))
    print(f"evaluation: {path}\nplot: {plot}")
    return path


def _console():
    from rich.console import Console

    return Console(width=120)


class UnlearnCLI(LightningCLI):
    """LightningCLI with the ``unlearn`` and ``evaluate`` subcommands."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "unlearn": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "demo": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        from lightning_unlearn.federated.runner import FederatedSettings

        parser.add_class_arguments(FederatedSettings, "federated")

    def before_fit(self) -> None:
        if hasattr(self.datamodule, "train_on"):
            self.datamodule.train_on = "all"  # the original model learns from everything

    # A federated data module in the config switches these to the federated protocol.
    def fit(self, model: pl.LightningModule, datamodule=None, **kwargs: Any) -> Any:
        from lightning_unlearn.federated.runner import federated_fit, is_federated

        if is_federated(datamodule):
            return federated_fit(model, datamodule, self._federated(), _seed())
        return self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def unlearn(self, model: pl.LightningModule, datamodule=None, **kwargs: Any) -> Path:
        from lightning_unlearn.federated.runner import is_federated

        if is_federated(datamodule):
            return self._federated_unlearn(model, datamodule, **kwargs)
        return self.trainer.unlearn(model, datamodule, **kwargs)

    def evaluate(self, model: pl.LightningModule, datamodule=None, **kwargs: Any) -> Path:
        from lightning_unlearn.federated.runner import is_federated

        if is_federated(datamodule):
            return self._federated_evaluate(model, datamodule, **kwargs)
        return self.trainer.evaluate(model, datamodule, **kwargs)

    def _federated(self):
        return self.config_init[self.subcommand]["federated"]

    def _federated_unlearn(self, model, datamodule, ckpt_path: str, method: str = "grad_x_act", ratio: float = 0.1,
                           objective: str = "auto", output_dir: str | None = None, relearn: bool = False,
                           **ignored: Any) -> Path:
        from lightning_unlearn.evaluation import write_report
        from lightning_unlearn.evaluation.report import unique_path
        from lightning_unlearn.federated.runner import (
            _save,
            federated_unlearn_checkpoint,
            fedavg_round_bytes,
        )

        source = _existing(ckpt_path)
        original = copy.deepcopy(_load_weights(model, source))
        sim, result = federated_unlearn_checkpoint(model, datamodule, self._federated(), method, ratio, objective, _seed())
        out_dir = Path(output_dir) if output_dir else source.parent
        target = _save(result.model, unique_path(out_dir / f"{source.name.split('.')[0]}-unlearned.ckpt"))
        params = dict(ratio=ratio, objective=objective, federated=asdict(self._federated()),
                      source_checkpoint=str(source), lightning_checkpoint=str(target))
        fedavg = fedavg_round_bytes(original, datamodule.num_clients, self._federated().fraction)
        moved = {**result.bytes, "fedavg_round": fedavg}
        report, path = write_report(out_dir, original, result, sim.evaluation_datamodule, method, params, _seed(),
                                    bytes_moved=moved, relearn=relearn)
        _print_summary(report.metrics, report.mask["fraction"], result.timings_s)
        print(f"bytes per unlearning round: {result.bytes['unlearning_round']:,.0f} "
              f"(a FedAvg round: {fedavg:,.0f})")
        print(f"unlearned checkpoint: {target}\nreport: {path}")
        return target

    def _federated_evaluate(self, model, datamodule, ckpt_path: str, unlearned_path: str, retrained_path: str | None = None,
                            output_dir: str | None = None, relearn: bool = True, **ignored: Any) -> Path:
        from lightning_unlearn.federated.runner import deployed_simulation, federated_reference

        original = _load_weights(copy.deepcopy(model), _existing(ckpt_path))
        unlearned = _load_weights(copy.deepcopy(model), _existing(unlearned_path))
        sim, plan = deployed_simulation(copy.deepcopy(original), datamodule, self._federated(), _seed())
        timings = {}
        if retrained_path:
            retrained = _load_weights(copy.deepcopy(model), _existing(retrained_path))
        else:
            reference = federated_reference(sim, plan, self._federated(), _seed())
            retrained, timings["retrain"] = reference.model, reference.timings_s["retrain"]
        out_dir = Path(output_dir) if output_dir else Path(unlearned_path).parent
        return write_evaluation(original, unlearned, retrained, sim.evaluation_datamodule, out_dir, relearn,
                                {"original": str(ckpt_path), "unlearned": str(unlearned_path), "timings_s": timings})


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def _load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Weights from a Lightning checkpoint (``state_dict`` key) or a plain state dict file."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit the configured model: {str(err).splitlines()[0]}") from None
    return model


def _seed() -> int:
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _print_summary(metrics: dict, fraction: float, timings: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="unlearning result")
    for col in ("model", "forget acc (%)", "remaining acc (%)", "test acc (%)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in metrics.items():
        table.add_row(name, *(f"{100 * m[k]:.1f}" for k in ("forget_acc", "remaining_acc", "test_acc")))
    _console().print(table)
    print(f"parameters updated: {100 * fraction:.2f}%  scoring: {timings.get('scoring', 0):.2f}s  "
          f"total: {timings['total']:.2f}s")


#: Command groups with their own parser: ``lightning-unlearn requests ...`` -> ``lightning_unlearn.ledger.cli.main``.
COMMAND_GROUPS = {"requests": "lightning_unlearn.ledger.cli", "sisa": "lightning_unlearn.exact.cli"}


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors end with one line on stderr and exit code 2."""
    from argparse import ArgumentError

    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMAND_GROUPS:
        import importlib

        sys.exit(importlib.import_module(COMMAND_GROUPS[argv[0]]).main(argv[1:]))

    trainer_defaults = {"logger": _default_logger()}
    quiet = {"exit_on_error": False}
    try:
        UnlearnCLI(
            model_class=pl.LightningModule,
            datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_class=UnlearningTrainer,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            args=args,
            auto_configure_optimizers=False,
            parser_kwargs={**quiet, **{name: quiet for name in UnlearnCLI.subcommands()}},
        )
    except (ArgumentError, *USER_ERRORS) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lightning-unlearn: error: {_one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _one_line(message: str) -> str:
    """The informative line of a (possibly nested, multi-line) jsonargparse error."""
    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip()]
    where = next((line[len("Parser key "):].rstrip(":") for line in lines if line.startswith("Parser key ")), None)
    noise = ("Expected a", "Given value", "Subtypes:", "Errors:", "Does not validate", "Problem with", "Parser key")
    useful = [line for line in lines if not line.startswith(noise)] or lines or [str(message)]
    first = useful[0]
    return f"{where}: {first}" if where and where not in first else first


def _default_logger() -> dict:
    """TensorBoard when installed, CSV otherwise."""
    try:
        import tensorboard  # noqa: F401

        return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "outputs"}}
    except ImportError:
        return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs"}}


if __name__ == "__main__":
    main()
