"""``lightning-unlearn sisa fit | unlearn | evaluate``: exact unlearning from the same YAML configs.

The ``model:`` and ``data:`` sections of a LightningCLI config (``configs/digits_cnn.yaml``) give
the shard model and the data; ``trainer.accelerator / devices / precision / deterministic`` are
used for every slice, ``trainer.max_epochs`` sets the default epochs; other trainer keys are ignored.
The request to delete is the data module's ``request`` (``forget_classes`` / ``forget_sample_ids`` /
``forget_clients`` of the preset data modules)::

    lightning-unlearn sisa fit      --config configs/digits_cnn.yaml --sisa.dir outputs/sisa --sisa.shards 5 --sisa.slices 5
    lightning-unlearn sisa unlearn  --config configs/digits_cnn.yaml --sisa.dir outputs/sisa --sisa.shards 5 --sisa.slices 5
    lightning-unlearn sisa evaluate --config configs/digits_cnn.yaml --sisa.dir outputs/sisa --sisa.shards 5 --sisa.slices 5

One process per device trains a subset of shards into the same directory:
``CUDA_VISIBLE_DEVICES=k lightning-unlearn sisa fit ... --sisa.shard_ids [k]``.
"""
from __future__ import annotations

import sys
from argparse import ArgumentError
from typing import Any, Optional, Union

import lightning.pytorch as pl
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_unlearn.exact.plan import AGGREGATIONS, SISAConfig

COMMANDS = {
    "fit": "train the shard models (all, or --sisa.shard_ids) slice by slice, with a checkpoint per slice",
    "unlearn": "delete the data module's request exactly: retrain only the affected shards",
    "evaluate": "test accuracy of the ensemble and of each shard model; --sisa.export writes the ensemble",
}
TRAINER_KEYS = ("accelerator", "devices", "precision", "deterministic")
USER_ERRORS = (ArgumentError, ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError, TypeError)


def _command_parser(command: str) -> ArgumentParser:
    p = ArgumentParser(description=COMMANDS[command], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="a LightningCLI YAML config (model:, data:, trainer:)")
    p.add_subclass_arguments(pl.LightningModule, "model", required=True, help="the shard model")
    p.add_subclass_arguments(pl.LightningDataModule, "data", required=True, help="training / test data and the request")
    p.add_argument("--trainer", type=dict, default={}, help="only accelerator, devices, precision, deterministic, max_epochs are used")
    p.add_argument("--seed_everything", type=Union[bool, int], default=0, help="default for --sisa.seed")
    p.add_argument("--sisa.dir", type=str, required=True, help="the run directory (plan, checkpoints, reports)")
    p.add_argument("--sisa.shards", type=Optional[int], default=None, help="default: the run's, else 5")
    p.add_argument("--sisa.slices", type=Optional[int], default=None, help="default: the run's, else 1")
    p.add_argument("--sisa.epochs_per_slice", type=Optional[int], default=None,
                   help="default: the run's, else the sample passes of trainer.max_epochs: round(2 E / (slices + 1))")
    p.add_argument("--sisa.batch_size", type=Optional[int], default=None,
                   help="default: the run's, else the data module's batch_size")
    p.add_argument("--sisa.seed", type=Optional[int], default=None, help="default: the run's, else seed_everything")
    p.add_argument("--sisa.aggregation", type=Optional[str], default=None,
                   help=f"one of {list(AGGREGATIONS)}; default: the run's, else mean_proba")
    if command in ("fit", "unlearn"):
        p.add_argument("--sisa.ledger", type=Optional[str], default=None,
                       help="request ledger (SQLite file or SQLAlchemy URL): fit records the ensemble as a model "
                            "version; unlearn serves the ledger's pending requests instead of the data's request")
        p.add_argument("--sisa.source", type=str, default="default", help="the ledger's data source name")
    if command == "fit":
        p.add_argument("--sisa.shard_ids", type=Optional[list[int]], default=None,
                       help="train only these shards (one process per device), e.g. [0, 1]")
    if command == "evaluate":
        p.add_argument("--sisa.export", type=Optional[str], default=None, help="write the ensemble to this file")
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-unlearn sisa", description="Exact unlearning with SISA", exit_on_error=False)
    sub = parser.add_subcommands(dest="command")
    for name, help_text in COMMANDS.items():
        sub.add_subcommand(name, _command_parser(name), help=help_text)
    return parser


def main(argv: list[str]) -> int:
    """Run one ``sisa`` command; user errors print one line and return 2."""
    parser = build_parser()
    try:
        cfg = parser.parse_args(list(argv))
        command = cfg.command
        return _run(command, cfg[command])
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lightning-unlearn: error: {_one_line(message)}", file=sys.stderr)
        return 2


def _run(command: str, cfg: Namespace) -> int:
    from lightning_unlearn.data.presets import datasets_of
    from lightning_unlearn.exact.sisa import SISA, client_ids

    model_parser = ArgumentParser(exit_on_error=False)
    model_parser.add_subclass_arguments(pl.LightningModule, "model")
    model_cfg = Namespace(model=cfg.model)
    factory = lambda: model_parser.instantiate_classes(model_cfg).model  # noqa: E731
    data_parser = ArgumentParser(exit_on_error=False)
    data_parser.add_subclass_arguments(pl.LightningDataModule, "data")
    datamodule = data_parser.instantiate_classes(Namespace(data=cfg.data)).data
    train, test = datasets_of(datamodule)
    trainer = dict(cfg.trainer or {})
    config = _sisa_config(cfg, trainer, datamodule)
    trainer_kwargs = {k: trainer[k] for k in TRAINER_KEYS if k in trainer}
    groups = client_ids(datamodule) if hasattr(datamodule, "client_indices") else None
    run = SISA(cfg.sisa.dir, factory, train, config, groups=groups, trainer_kwargs=trainer_kwargs)

    if command == "fit":
        seconds = run.fit(cfg.sisa.shard_ids)
        for shard, s in seconds.items():
            print(f"shard {shard}: trained in {s:.1f} s")
        print(f"SISA run {run.root}: {config.shards} shards x {config.slices} slices, "
              f"{config.epochs_per_slice} epoch(s) per slice; checkpoints {run.storage_bytes() / 1e6:.1f} MB")
        if cfg.sisa.ledger:
            _record_in_ledger(run, cfg.sisa.ledger, cfg.sisa.source, train)
        return 0
    if command == "unlearn" and cfg.sisa.ledger:
        return _serve_ledger(run, cfg.sisa.ledger, cfg.sisa.source, test)
    if command == "unlearn":
        request = getattr(datamodule, "request", None)
        if request is None:
            raise ValueError("the data module has no `request`: set data.init_args.forget_classes, "
                             "forget_sample_ids or forget_clients")
        result = run.forget(request, test_dataset=test)
        print(f"deleted {request.to_dict()}: {len(result.sample_ids)} sample(s); shards retrained "
              f"{sorted(result.affected) or 'none (already deleted)'} in {result.seconds:.1f} s")
        for key in ("forget_acc", "remaining_acc", "test_acc"):
            value = result.metrics.get(key)
            print(f"  ensemble {key}: {'-' if value is None else f'{100 * value:.2f}%'}")
        print(f"report: {result.report_path}")
        return 0
    return _evaluate(run, test, cfg)


def _record_in_ledger(run, db: str, source_name: str, train) -> None:
    from lightning_unlearn._io import unique_path
    from lightning_unlearn.exact.serving import record_fit
    from lightning_unlearn.ledger import Ledger
    from lightning_unlearn.ledger.identity import sample_hashes

    from lightning_unlearn.evidence.report import weights_sha256

    untrained = [s for s in range(run.config.shards) if len(run.shard_state(s)["stages"]) < run.config.slices]
    if untrained:
        print(f"ledger: not recorded yet, shard(s) {untrained} still to train (rerun fit with --sisa.ledger when done)")
        return
    with Ledger(db) as ledger:
        source = ledger.register_source(source_name, sample_hashes(train))  # checks the data if already there
        known = ledger.find_version(weights_sha256(run.ensemble()))
        if known is not None:
            print(f"ledger {db}: already recorded as model version {known['id']}")
            return
        version = record_fit(run, ledger, source, unique_path(run.root / "ensemble-weights.pt"))
    print(f"ledger {db}: model version {version} (source {source_name!r}, method sisa, exact)")


def _serve_ledger(run, db: str, source_name: str, test) -> int:
    from lightning_unlearn.exact.serving import serve_requests
    from lightning_unlearn.ledger import Ledger

    with Ledger(db, create=False) as ledger:  # serving needs the ledger sisa fit --sisa.ledger recorded
        outcome = serve_requests(run, ledger, source_name, test, run.root / "jobs")
    if outcome["status"] == "idle":
        print("no pending requests")
    elif outcome["status"] == "unchanged":
        print(outcome["reason"])
    else:
        print(f"job {outcome['job'][:12]}: exact deletion, shards retrained {outcome['affected_shards']} in "
              f"{outcome['seconds']:.1f} s; model version {outcome['version']}, report {outcome['report']}")
    return 0


def _evaluate(run, test, cfg: Namespace) -> int:
    from torch.utils.data import DataLoader

    from lightning_unlearn._io import unique_path, write_json
    from lightning_unlearn.metrics import accuracy

    loader = DataLoader(test, batch_size=256)
    num_classes = int(max(run.targets.max(), 0)) + 1
    ensemble = run.ensemble()
    shards = {s: accuracy(model, loader, num_classes) for s, model in zip(ensemble.shard_ids, ensemble.models)}
    result = {"ensemble_test_acc": accuracy(ensemble, loader, num_classes), "aggregation": ensemble.aggregation,
              "shard_test_acc": shards, "storage_bytes": run.storage_bytes()}
    print(f"ensemble ({ensemble.aggregation}, {len(shards)} shards) test accuracy: {100 * result['ensemble_test_acc']:.2f}%")
    for s, acc in shards.items():
        print(f"  shard {s}: {100 * acc:.2f}%")
    if cfg.sisa.export:
        ensemble.save(cfg.sisa.export)
        print(f"ensemble written to {cfg.sisa.export}")
    path = write_json(result, unique_path(run.root / "evaluation.json"), overwrite=False)
    print(f"evaluation: {path}")
    return 0


def _sisa_config(cfg: Namespace, trainer: dict[str, Any], datamodule) -> SISAConfig:
    """Settings given on the command line, else the existing run's, else the defaults."""
    from lightning_unlearn.exact.sisa import SISA

    stored = SISA.stored_config(cfg.sisa.dir)
    given = {k: cfg.sisa[k] for k in ("shards", "slices", "epochs_per_slice", "batch_size", "seed", "aggregation")
             if cfg.sisa[k] is not None}
    if stored is not None:
        return SISAConfig(**{**stored.to_dict(), **given})
    slices = given.get("slices", 1)
    if "epochs_per_slice" not in given:
        max_epochs = int(trainer.get("max_epochs") or 10)
        given["epochs_per_slice"] = max(1, round(2 * max_epochs / (slices + 1))) if isinstance(slices, int) and slices > 0 else 1
    if "seed" not in given:
        given["seed"] = 0 if isinstance(cfg.seed_everything, bool) else cfg.seed_everything
    given.setdefault("batch_size", getattr(datamodule, "batch_size", 64))
    return SISAConfig(**{"shards": 5, "slices": 1, **given})


def _one_line(message: str) -> str:
    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip()]
    noise = ("Expected a", "Given value", "Subtypes:", "Errors:", "Does not validate", "Problem with")
    useful = [line for line in lines if not line.startswith(noise)] or lines or [str(message)]
    return useful[0]
