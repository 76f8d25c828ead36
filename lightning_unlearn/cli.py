"""``lightning-unlearn fit | validate | test | unlearn | evaluate --config ...`` (LightningCLI).

``unlearn`` and ``evaluate`` are methods of :class:`UnlearningTrainer`, so their signatures and
docstrings become the command-line options and help, exactly like ``fit``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_unlearn._io import load_torch_file
from lightning_unlearn.commands import CentralEngine, FederatedEngine, evaluate_checkpoints, unlearn_checkpoint
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.federated.runner import FederatedSettings, federated_fit

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, MisconfigurationException)


class UnlearningTrainer(pl.Trainer):
    """A Lightning Trainer with three more entry points: :meth:`unlearn`, :meth:`evaluate` and :meth:`demo`.

    How to unlearn is the ``unlearning:`` section of the config (:class:`~lightning_unlearn.UnlearnConfig`);
    the federated schedule is the ``federated:`` section. :class:`UnlearnCLI` reads both and runs
    :mod:`lightning_unlearn.commands`; called from Python, these methods use the default settings.
    """

    def unlearn(
        self,
        model: pl.LightningModule,
        datamodule: UnlearningDataModule,
        ckpt_path: str,
        output_dir: str | None = None,
        relearn: bool = False,
    ) -> Path:
        """Forget the data module's request in a trained checkpoint; write the unlearned checkpoint and its report.

        Args:
            ckpt_path: the trained checkpoint (read only, never overwritten).
            output_dir: where to write ``<name>-unlearned.ckpt``, the mask, the report and plots
                (default: next to ``ckpt_path``). Existing files get a ``-N`` suffix.
            relearn: also measure relearn time in the report (slower).
        """
        return run_unlearn(CentralEngine(self, _seed()), model, datamodule, ckpt_path, UnlearnConfig(seed=_seed()),
                           output_dir, relearn)

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
        attack: str | None = None,
        references: int = 8,
        reference_epochs: int | None = None,
        reference_cache: str = "outputs/references",
    ) -> Path:
        """Compare original, unlearned and retrained models: print the table, write plots and a JSON.

        Args:
            ckpt_path: the original trained checkpoint.
            unlearned_path: the checkpoint written by ``lightning-unlearn unlearn``.
            retrained_path: a retrained reference checkpoint; if absent one is retrained from scratch on
                the retain data for ``retrain_epochs`` (default: ``trainer.max_epochs``).
            retrain_epochs: epochs of that retraining (central engine).
            output_dir: where to write ``evaluation.json`` and plots (default: next to ``unlearned_path``).
            relearn: measure relearn time (fine-tuning steps to recover forget accuracy).
            attack: ``ulira``: the per-example membership attack against ``references`` reference models
                retrained from scratch (cached in ``reference_cache``, reused by later evaluations of the same
                request); results go into ``evaluation.json`` under ``ulira``.
            references: how many reference models the attack uses (>= 2; 64+ for a challenge-grade estimate).
            reference_epochs: training epochs of each reference model (default: ``trainer.max_epochs``).
            reference_cache: folder of the cached reference models.
        """
        return run_evaluate(CentralEngine(self, _seed()), model, datamodule, ckpt_path, unlearned_path, retrained_path,
                            retrain_epochs, output_dir, relearn, attack, references, reference_epochs,
                            reference_cache)

    def demo(self, model: pl.LightningModule, datamodule: UnlearningDataModule, attack: bool = True,
             attack_models: int = 6, attack_limit_s: float = 60.0) -> None:
        """Train, unlearn, retrain and fine-tune-all in one go and print the comparison table.

        Training and retraining use ``trainer.max_epochs``; unlearning and the fine-tune-all control
        use the ``unlearning:`` section's budget.

        Args:
            attack: also print the U-LiRA verdict (unlearned vs retrained, raw and class-calibrated AUC, next
                to the original's) on small populations; the demo's own models are their first members.
            attack_models: K, the originals, unlearned and retrained models per population (>= 3).
            attack_limit_s: skip the verdict, saying why, when its cost estimated from the demo's retraining
                is above this many seconds.
        """
        run_demo(model, datamodule, self.max_epochs or 20, UnlearnConfig(seed=_seed()), attack, attack_models,
                 attack_limit_s)


def run_unlearn(engine, model, datamodule, ckpt_path: str, config: UnlearnConfig, output_dir: str | None,
                relearn: bool) -> Path:
    """``lightning-unlearn unlearn`` on ``engine``: run the shared flow and print its summary."""
    outcome = unlearn_checkpoint(engine, model, datamodule, _existing(ckpt_path), config, output_dir, relearn, _seed())
    if outcome.report is not None:
        _print_summary(outcome.report.metrics, outcome.report.mask["fraction"], outcome.result.timings_s)
        moved = outcome.report.bytes_moved
        if moved:
            print(f"bytes per unlearning round: {moved['unlearning_round']:,.0f} "
                  f"(a FedAvg round: {moved['fedavg_round']:,.0f})")
        print(f"unlearned checkpoint: {outcome.checkpoint}\nreport: {outcome.report_path}")
    return outcome.checkpoint


def run_evaluate(engine, model, datamodule, ckpt_path: str, unlearned_path: str, retrained_path: str | None = None,
                 retrain_epochs: int | None = None, output_dir: str | None = None, relearn: bool = True,
                 attack: str | None = None, references: int = 8, reference_epochs: int | None = None,
                 reference_cache: str = "outputs/references") -> Path:
    """``lightning-unlearn evaluate`` on ``engine``: the comparison table, the plot and ``evaluation.json``."""
    from lightning_unlearn.evidence import compare

    for path in (ckpt_path, unlearned_path, retrained_path):
        if path:
            _existing(path)
    payload, path = evaluate_checkpoints(engine, model, datamodule, ckpt_path, unlearned_path, retrained_path,
                                         retrain_epochs, output_dir, relearn, _seed(), attack=attack,
                                         references=references, reference_epochs=reference_epochs,
                                         reference_cache=reference_cache)
    evaluation = payload["metrics"]
    comparison = evaluation["comparison"]
    rows = [{"method": name, **evaluation[name]} for name in ("original", "unlearned", "retrained")]
    rows[1].update({k: v for k, v in comparison.items() if k in ("avg_gap", "acc_gap", "tow")})
    for row in rows:
        if comparison.get(f"relearn_steps_{row['method']}") is not None:
            row["relearn_steps"] = comparison[f"relearn_steps_{row['method']}"]
    compare(rows, title=f"request {payload['request']}", console=_console())
    if attack is not None:
        _print_attack(payload[attack], attack)
    print(f"evaluation: {path}\nplot: {payload['plots'][0]}")
    return path


def _print_attack(result: dict, attack: str) -> None:
    from rich.table import Table

    table = Table(title=f"{attack}: forget samples vs held-out samples, {result['references']} reference models")
    for col in ("model", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in result["per_model"].items():
        table.add_row(name, f"{r['auc']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{r['tpr_at_0.1pct_fpr']:.3f}")
    _console().print(table)
    verdict = "informative" if result["informative"] else "UNINFORMATIVE (the original is not detected)"
    print(f"attack {verdict}: {result['informative_rule']}")


def run_demo(model, datamodule, epochs: int, config: UnlearnConfig, attack: bool = True, attack_models: int = 6,
             attack_limit_s: float = 60.0) -> None:
    """``lightning-unlearn demo``: train, unlearn, retrain, fine-tune all; print the table and the attack's verdict."""
    import logging
    import warnings

    from lightning_unlearn.demo import attack_verdict, compare_with_references, print_speed, print_table

    if isinstance(attack_models, bool) or not isinstance(attack_models, int) or attack_models < 3:
        raise ValueError(f"attack_models must be an integer >= 3 (leave-one-out keeps 2 per population), "
                         f"got {attack_models!r}")
    if not attack_limit_s >= 0:
        raise ValueError(f"attack_limit_s must be >= 0 seconds, got {attack_limit_s!r}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = compare_with_references(model, datamodule, epochs, config)
    print_table(results, f"Forget {datamodule.request.to_dict()} ({config.method}, ratio {config.ratio})")
    print_speed(results)
    if attack:
        print(attack_verdict(results, datamodule, epochs, config, attack_models, attack_limit_s))


def _console():
    from rich.console import Console

    return Console(width=120)


class UnlearnCLI(LightningCLI):
    """LightningCLI with the ``unlearn``, ``evaluate`` and ``demo`` subcommands and the ``unlearning:`` section."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "unlearn": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
            "demo": {"model", "datamodule"},
        }

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(UnlearnConfig, "unlearning")
        parser.add_class_arguments(FederatedSettings, "federated")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyper-parameters while parsing: check the file first, one line if bad."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and Path(path).is_file():
            load_torch_file(path, "checkpoint")
        super()._parse_ckpt_path()

    # A federated data module in the config switches these to the federated engine.
    def fit(self, model: pl.LightningModule, datamodule=None, **kwargs: Any) -> Any:
        if isinstance(datamodule, FederatedDataModule):
            return federated_fit(model, datamodule, self._section("federated"), _seed(), echo=print)
        if isinstance(datamodule, UnlearningDataModule):  # the original model learns from every sample
            val = datamodule.val_dataloader() if is_overridden("val_dataloader", datamodule, pl.LightningDataModule) else None
            return self.trainer.fit(model, train_dataloaders=datamodule.full_train_dataloader(), val_dataloaders=val,
                                    **kwargs)
        return self.trainer.fit(model, datamodule=datamodule, **kwargs)

    def unlearn(self, model: pl.LightningModule, datamodule=None, ckpt_path: str = "", output_dir: str | None = None,
                relearn: bool = False) -> Path:
        return run_unlearn(self._engine(datamodule), model, datamodule, ckpt_path, self._config(), output_dir, relearn)

    def evaluate(self, model: pl.LightningModule, datamodule=None, **kwargs: Any) -> Path:
        return run_evaluate(self._engine(datamodule), model, datamodule, **kwargs)

    def demo(self, model: pl.LightningModule, datamodule=None, attack: bool = True, attack_models: int = 6,
             attack_limit_s: float = 60.0) -> None:
        if isinstance(datamodule, FederatedDataModule):
            raise ValueError("demo runs centrally; use a central data config (e.g. configs/digits_cnn.yaml)")
        run_demo(model, datamodule, self.trainer.max_epochs or 20, self._config(), attack, attack_models,
                 attack_limit_s)

    def _section(self, name: str):
        return self.config_init[self.subcommand][name]

    def _config(self) -> UnlearnConfig:
        config = self._section("unlearning")
        if config.seed == 0 and _seed():
            config = UnlearnConfig.build(config, seed=_seed())  # seed_everything seeds the run unless set here
        return config

    def _engine(self, datamodule):
        if isinstance(datamodule, FederatedDataModule):
            return FederatedEngine(self._section("federated"), _seed())
        return CentralEngine(self.trainer, _seed())


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


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
            args=None if args is None and argv == sys.argv[1:] else argv,
            auto_configure_optimizers=False,
            parser_kwargs={**quiet, **{name: quiet for name in UnlearnCLI.subcommands()}},
        )
    except (ArgumentError, *USER_ERRORS) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lightning-unlearn: error: {_one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _one_line(message: str) -> str:
    """The informative line of a (possibly nested, multi-line) jsonargparse error, with the key and the bad value."""
    import re

    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip()]
    keys = [m.group(1) for line in lines if (m := re.match(r'Parser key "([^"]+)"', line))]
    where = ".".join(dict.fromkeys(keys)) or None
    # A class's own error (``batch_size must be >= 1, got 0``) comes with the whole section as the "given value",
    # a ``Namespace(...)`` dump: the error already names the value, so only values a user typed are appended.
    given = [re.split(r"(?:Given|Got) value: ", line, maxsplit=1)[1] for line in lines
             if re.search(r"(?:Given|Got) value: ", line) and "NestedArg" not in line]
    values = [value for value in given if not value.startswith("Namespace(")]
    expected = sorted({re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line[len("Expected a "):]).split(".")[0]
                       for line in lines if line.startswith("Expected a ")})
    noise = ("Expected a", "Given value", "Subtypes:", "Errors:", "Does not validate", "Problem with", "Parser key")
    useful = [re.sub(r"(?:Given|Got) value: .*", "", line).rstrip(". ") for line in lines if not line.startswith(noise)]
    useful = [line for line in useful if line]
    first = useful[0] if useful else (f"expected {' or '.join(expected)}" if expected else (lines or [str(message)])[0])
    if values and values[0] not in first:
        first = f"{first}, got {values[0]!r}"
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
