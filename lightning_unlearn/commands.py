"""The flows behind ``lightning-unlearn unlearn`` and ``evaluate``: one flow each, the engine is the only switch.

An engine runs the method and the exact reference where the data lives: :class:`CentralEngine` on
the user's Trainer, :class:`FederatedEngine` in the federated simulation (the config's ``federated:``
section). Everything else (loading, the report, the comparison) is shared.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint

from lightning_unlearn._io import RunMarker, check_writable_dir, is_incomplete, load_torch_file, unique_path, write_json
from lightning_unlearn.api import result_of, retrain
from lightning_unlearn.callbacks.selective import SelectiveUnlearning
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data.unlearning import UnlearningDataModule
from lightning_unlearn.evidence import attack_evidence, evaluate_unlearning, write_report
from lightning_unlearn.evidence.plots import plot_per_class_accuracy
from lightning_unlearn.evidence.report import UnlearningReport
from lightning_unlearn.federated import federated_retrain, federated_unlearn
from lightning_unlearn.federated.fedavg import deploy_model
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.runner import FederatedSettings, fedavg_round_bytes, save_checkpoint, simulation
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.result import UnlearningResult


log = logging.getLogger(__name__)


class Engine(Protocol):
    """Where unlearning and retraining run."""

    name: str
    is_global_zero: bool

    def unlearn(self, model: pl.LightningModule, datamodule: Any, config: UnlearnConfig) -> UnlearningResult: ...

    def reserve(self, wanted: Path) -> Path: ...

    def save(self, result: UnlearningResult, target: Path) -> Path: ...

    def evaluation_datamodule(self, datamodule: Any, original: pl.LightningModule | None = None) -> UnlearningDataModule: ...

    def retrain(self, original: pl.LightningModule, datamodule: Any, epochs: int | None) -> UnlearningResult: ...

    def describe(self, original: pl.LightningModule, result: UnlearningResult | None) -> dict[str, Any]: ...


class CentralEngine:
    """The user's Trainer: :class:`SelectiveUnlearning` added as a callback, checkpoints written by Lightning."""

    name = "central"

    def __init__(self, trainer: pl.Trainer, seed: int) -> None:
        self.trainer, self.seed = trainer, seed
        self.train_epochs = trainer.max_epochs  # the training schedule, for retraining

    @property
    def is_global_zero(self) -> bool:
        return self.trainer.is_global_zero

    def unlearn(self, model: pl.LightningModule, datamodule: Any, config: UnlearnConfig) -> UnlearningResult:
        callback = SelectiveUnlearning(config, log_metrics=True)
        # never let a ModelCheckpoint from the training config write over the input
        self.trainer.callbacks = [c for c in self.trainer.callbacks if not isinstance(c, (Checkpoint, SelectiveUnlearning))]
        self.trainer.callbacks.append(callback)
        # the callback owns the budget (step budget, epochs, stopping rule), like EarlyStopping
        self.trainer.fit_loop.max_epochs = config.epochs if config.epochs is not None else -1
        start = time.perf_counter()
        self.trainer.fit(model, datamodule=datamodule)
        return result_of(callback, model, datamodule, time.perf_counter() - start)

    def reserve(self, wanted: Path) -> Path:
        """A fresh path for the checkpoint, chosen on rank 0 and the same on every rank."""
        return Path(self.trainer.strategy.broadcast(str(unique_path(wanted)) if self.is_global_zero else None))

    def save(self, result: UnlearningResult, target: Path) -> Path:
        """A Lightning checkpoint (with the mask in the callback state) at ``target``, written atomically."""
        tmp = target.with_name(f".{target.name}.tmp")
        self.trainer.save_checkpoint(tmp)
        if self.is_global_zero:
            os.chmod(tmp, 0o644)
            os.link(tmp, target)
            os.unlink(tmp)
        self.trainer.strategy.barrier()
        return target

    def evaluation_datamodule(self, datamodule: Any, original: pl.LightningModule | None = None) -> UnlearningDataModule:
        return datamodule

    def retrain(self, original: pl.LightningModule, datamodule: Any, epochs: int | None) -> UnlearningResult:
        return retrain(original, datamodule, epochs=epochs or self.train_epochs or 10, seed=self.seed)

    def describe(self, original: pl.LightningModule, result: UnlearningResult | None) -> dict[str, Any]:
        return {"engine": self.name}


class FederatedEngine:
    """The in-process federation of a :class:`~lightning_unlearn.data.FederatedDataModule` config."""

    name = "federated"
    is_global_zero = True

    def __init__(self, settings: FederatedSettings, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self._sim = None

    def unlearn(self, model: pl.LightningModule, datamodule: Any, config: UnlearnConfig) -> UnlearningResult:
        sim = self._deployed(model, datamodule)
        s = self.settings
        result = federated_unlearn(sim.model, sim.clients, datamodule.request, config, rounds=s.unlearn_rounds,
                                   fraction=s.fraction, trained_epochs=s.rounds * s.local_epochs)  # calibration length
        result.metrics = sim.evaluate(result.model)
        return result

    def reserve(self, wanted: Path) -> Path:
        return unique_path(wanted)

    def save(self, result: UnlearningResult, target: Path) -> Path:
        return save_checkpoint(result.model, target)

    def _deployed(self, model: pl.LightningModule, datamodule: Any):
        """A federation whose clients hold ``model`` as the deployed global model and know the request."""
        self._sim = simulation(model, datamodule, self.settings, self.seed)
        deploy_model(Federation(self._sim.clients.grid, len(self._sim.clients)), get_arrays(model))
        self._sim.request(datamodule.request)
        return self._sim

    def _simulation(self, original: pl.LightningModule, datamodule: Any):
        return self._sim if self._sim is not None else self._deployed(copy.deepcopy(original), datamodule)

    def evaluation_datamodule(self, datamodule: Any, original: pl.LightningModule | None = None) -> UnlearningDataModule:
        """The oracle's central view of the request (built from ``original`` if no run built the federation yet)."""
        if self._sim is None:
            if original is None:
                raise RuntimeError("the federation is built by unlearn() or retrain(), or from the original model")
            self._simulation(original, datamodule)
        return self._sim.evaluation_datamodule

    def retrain(self, original: pl.LightningModule, datamodule: Any, epochs: int | None) -> UnlearningResult:
        sim, s = self._simulation(original, datamodule), self.settings
        return federated_retrain(sim.model, sim.clients, sim.plan, s.rounds, s.local_epochs, s.fraction, seed=self.seed)

    def describe(self, original: pl.LightningModule, result: UnlearningResult | None) -> dict[str, Any]:
        out: dict[str, Any] = {"engine": self.name, "federated": asdict(self.settings)}
        if result is not None:
            fedavg = fedavg_round_bytes(original, len(self._sim.clients), self.settings.fraction)
            out["bytes_moved"] = {**getattr(result, "bytes", {}), "fedavg_round": fedavg}
        return out


@dataclass
class UnlearnOutcome:
    """What ``unlearn`` wrote: the checkpoint, the report and its path."""

    checkpoint: Path
    report: UnlearningReport | None
    report_path: Path | None
    result: UnlearningResult


def unlearn_checkpoint(
    engine: Engine,
    model: pl.LightningModule,
    datamodule: Any,
    ckpt_path: str | os.PathLike,
    config: UnlearnConfig,
    output_dir: str | os.PathLike | None = None,
    relearn: bool = False,
    seed: int = 0,
) -> UnlearnOutcome:
    """Forget the data module's request in a trained checkpoint; write the unlearned checkpoint and its report.

    The output directory is checked before any work; the run's files (checkpoint, weights, mask,
    plots, report) are listed in a :class:`RunMarker` before they are written and count as finished
    only once the marker is gone, so a killed run leaves nothing that looks done, and the next run in
    that directory deletes what it left.
    """
    source = Path(ckpt_path)
    out_dir = Path(output_dir) if output_dir else source.parent
    if engine.is_global_zero:
        check_writable_dir(out_dir)
        for leftover in RunMarker.clean(out_dir):
            log.warning("removed %s, left by an interrupted unlearning run", leftover)
    load_weights(model, source)
    if config.calibrate_epochs == "auto" and (epochs := trained_epochs(source)):
        config = UnlearnConfig.build(config, calibrate_epochs=epochs)  # the original's schedule, from its checkpoint
    original = copy.deepcopy(model)
    result = engine.unlearn(model, datamodule, config)
    target = engine.reserve(out_dir / f"{source.name.split('.')[0]}-unlearned.ckpt")
    marker = RunMarker(target)
    if engine.is_global_zero:
        marker.add(target)
    engine.save(result, target)
    if not engine.is_global_zero:
        return UnlearnOutcome(target, None, None, result)
    described = engine.describe(original, result)
    bytes_moved = described.pop("bytes_moved", None)
    params = {**(result.config or config).to_dict(), **described, "source_checkpoint": str(source),
              "lightning_checkpoint": str(target)}
    report, path = write_report(out_dir, original, result, engine.evaluation_datamodule(datamodule), config.method,
                                params, seed, bytes_moved=bytes_moved, relearn=relearn, marker=marker)
    marker.done()
    return UnlearnOutcome(target, report, path, result)


def evaluate_checkpoints(
    engine: Engine,
    model: pl.LightningModule,
    datamodule: Any,
    ckpt_path: str | os.PathLike,
    unlearned_path: str | os.PathLike,
    retrained_path: str | os.PathLike | None = None,
    retrain_epochs: int | None = None,
    output_dir: str | os.PathLike | None = None,
    relearn: bool = True,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    attack: str | None = None,
    references: int = 8,
    reference_epochs: int | None = None,
    reference_cache: str | os.PathLike = "outputs/references",
) -> tuple[dict[str, Any], Path]:
    """Original vs unlearned vs retrained (``retrained_path`` or a fresh retraining): metrics, plot, ``evaluation.json``.

    ``attack="ulira"`` adds the per-example membership attack with ``references`` cached reference
    models (:func:`~lightning_unlearn.evidence.attack_evidence`), written under the attack's name.
    """
    if attack is not None and engine.name != "central":
        raise ValueError(f"attack={attack!r} needs reference models retrained centrally; the {engine.name} engine "
                         "cannot train them yet (evaluate the checkpoints with a central data config)")
    out_dir = check_writable_dir(Path(output_dir) if output_dir else Path(unlearned_path).parent)
    original = load_weights(copy.deepcopy(model), Path(ckpt_path))
    unlearned = load_weights(copy.deepcopy(model), Path(unlearned_path))
    timings: dict[str, float] = {}
    reference = engine.retrain(original, datamodule, retrain_epochs) if not retrained_path else None
    if reference is None:
        retrained = load_weights(copy.deepcopy(model), Path(retrained_path))
    else:
        retrained, timings["retrain"] = reference.model, reference.timings_s["retrain"]
    dm = engine.evaluation_datamodule(datamodule, original)
    evaluation = evaluate_unlearning(original, unlearned, dm, retrained, seed=seed, relearn=relearn)
    attacks = {}
    if attack is not None:
        epochs = reference_epochs or getattr(getattr(engine, "trainer", None), "max_epochs", None) or 10
        attacks = attack_evidence(original, unlearned, dm, references, attack, epochs, cache_dir=reference_cache,
                                  seed=seed, models={"retrained": retrained})
    per_class = {k: evaluation[k]["per_class_test_acc"] for k in ("original", "unlearned", "retrained")}
    plot = plot_per_class_accuracy(per_class, unique_path(out_dir / "evaluation.per_class.png"), dm.request.classes)
    payload = {"request": dm.request.to_dict(), "original": str(ckpt_path), "unlearned": str(unlearned_path),
               "engine": engine.name, "timings_s": timings, "metrics": evaluation, "plots": [str(plot)],
               **attacks, **(extra or {})}
    path = write_json(payload, unique_path(out_dir / "evaluation.json"), overwrite=False)
    return payload, path


def trained_epochs(path: Path) -> int | None:
    """Epochs the checkpoint's model was trained for (Lightning's fit-loop progress, else ``epoch`` + 1), or None
    (a plain state dict, or values that are not counts)."""
    state = load_torch_file(path, "checkpoint")
    if not isinstance(state, dict):
        return None
    try:
        epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    except (KeyError, TypeError):
        epoch = state.get("epoch")
        epochs = epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1 else None


def load_weights(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Weights from a Lightning checkpoint (``state_dict`` key) or a plain state dict file, ``weights_only=True``."""
    if is_incomplete(path):
        raise ValueError(f"checkpoint {path} belongs to an unlearning run that did not finish; rerun "
                         "`lightning-unlearn unlearn` (it removes the leftovers)")
    state = load_torch_file(path, "checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit the configured model: {str(err).splitlines()[0]}") from None
    return model
