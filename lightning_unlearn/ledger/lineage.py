"""Lineage recorded as a side effect of training: which samples (and clients) reached which model version.

:class:`RecordLineage` is a Lightning callback: add it to the Trainer, the module stays as it is.
:func:`record_federated` does the same after a FedAvg run from its round history.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from lightning_unlearn._io import load_torch_file, save_torch
from lightning_unlearn.evidence.report import weights_sha256
from lightning_unlearn.ledger.identity import base_dataset, demo_subjects, sample_hashes, subject_list
from lightning_unlearn.ledger.schema import utcnow
from lightning_unlearn.ledger.store import Ledger, Source

log = logging.getLogger(__name__)


@dataclass
class _Snapshot:
    weights_sha256: str
    trained: np.ndarray
    step: int


class RecordLineage(Callback):
    """Record in a ledger which training samples reached the model versions this ``fit`` produces.

    At the start of training the train dataloader's dataset is registered as the data source
    ``source_name`` (a ``Subset`` resolves to indices of the dataset underneath; content hashes
    per sample). At each saved checkpoint and at the end of ``fit`` a model version is recorded:
    its weights' SHA-256, the checkpoint path, the parent version (the recorded version whose
    weights the fit started from, or ``parent_version``) and the samples the dataloader drew.

    "Drew" is exact when an epoch ran to its end with a sampler that visits every sample (random
    without replacement, sequential, distributed) or with a sequential sampler; otherwise (a
    custom or weighted sampler stopped mid-epoch) every sample of the loader is recorded: the
    record may claim more than was seen, never less.

    Args:
        ledger_url: SQLite file path or SQLAlchemy URL of the ledger.
        source_name: name of the data source in the ledger (its content must not change under it).
        subjects: data subject per sample: a CSV path (``sample_index,subject_id``), a mapping or a list.
        demo_subjects: instead of ``subjects``, spread the samples over this many made-up subjects
            ``user-0`` ... (seeded): for demos on data that has no subjects.
        weights_path: also save the final weights (state dict) here and record it as the checkpoint;
            must not exist yet. Without it the version's checkpoint is the ``ModelCheckpoint`` file
            holding the final weights, if any.
        parent_version: the version this fit continues from, when its weights are not in the ledger.
    """

    def __init__(
        self,
        ledger_url: str,
        source_name: str,
        subjects: str | dict[int, str] | list[str | None] | None = None,
        demo_subjects: int | None = None,
        weights_path: str | None = None,
        parent_version: int | None = None,
    ) -> None:
        if subjects is not None and demo_subjects is not None:
            raise ValueError("give subjects or demo_subjects, not both")
        if not source_name or not str(source_name).strip():
            raise ValueError(f"source_name must be a non-empty string, got {source_name!r}")
        self.ledger_url, self.source_name = str(ledger_url), source_name
        self.subjects, self.demo_subjects = subjects, demo_subjects
        self.weights_path, self.parent_version = weights_path, parent_version
        self.versions: list[int] = []  # ids recorded by the last fit, in order
        self.timings_s: dict[str, float] = {}
        self._loader: DataLoader | None = None
        self._universe = np.zeros(0, dtype=np.int64)
        self._epoch_batches = 0
        self._most_batches = 0
        self._complete_epoch = False
        self._snapshots: list[_Snapshot] = []
        self._started: datetime | None = None
        self._parent: int | None = None
        self._source: Source | None = None

    # -- hooks --------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t0 = time.perf_counter()
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(f"RecordLineage records one train DataLoader; this fit trains on a {type(loader).__name__}")
        if self.weights_path is not None and Path(self.weights_path).exists():
            raise FileExistsError(f"weights_path {self.weights_path} exists; RecordLineage never overwrites weights")
        self._loader, self._started = loader, utcnow()
        self._epoch_batches = self._most_batches = 0
        self._complete_epoch, self._snapshots, self.versions = False, [], []
        base, indices = base_dataset(loader.dataset)
        self._universe = np.arange(len(base), dtype=np.int64) if indices is None else np.unique(indices)
        if not trainer.is_global_zero:
            return
        hashes = sample_hashes(base)
        self.timings_s["hash_samples"] = time.perf_counter() - t0
        if self.demo_subjects is not None:
            subjects = demo_subjects(len(hashes), self.demo_subjects)
        else:
            subjects = subject_list(self.subjects, len(hashes))
        ledger = Ledger(self.ledger_url)
        try:
            self._source = ledger.register_source(self.source_name, hashes, subjects)
            start = ledger.find_version(weights_sha256(pl_module))
            self._parent = self.parent_version if self.parent_version is not None else (start["id"] if start else None)
        finally:
            ledger.close()
        self.timings_s["start"] = time.perf_counter() - t0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_batches = 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._epoch_batches += 1

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero and "state_dict" in checkpoint:
            self._snapshots.append(_Snapshot(weights_sha256(checkpoint["state_dict"]), self._drawn(mid_epoch=True),
                                             trainer.global_step))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._source is None:
            return
        t0 = time.perf_counter()
        final_hash = weights_sha256(pl_module)
        final = _Snapshot(final_hash, self._drawn(), trainer.global_step)
        by_hash = {snap.weights_sha256: snap for snap in self._snapshots}
        by_hash.setdefault(final_hash, final)
        recorded: list[tuple[_Snapshot, str | None]] = []
        for path in _checkpoint_files(trainer, self._started.timestamp() - 1):
            try:
                state = load_torch_file(path, "checkpoint")
            except ValueError as err:  # not ours to judge: a file we cannot read is simply not recorded
                log.warning("RecordLineage: skipping %s", err)
                continue
            digest = weights_sha256(state.get("state_dict", state) if isinstance(state, dict) else state)
            if digest in by_hash and all(digest != snap.weights_sha256 for snap, _ in recorded):
                recorded.append((by_hash[digest], str(Path(path).resolve())))
        if self.weights_path is not None:
            saved = save_torch({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.weights_path,
                               overwrite=False)
            recorded = [(snap, p) for snap, p in recorded if snap.weights_sha256 != final_hash]
            recorded.append((final, str(saved.resolve())))
        elif all(snap.weights_sha256 != final_hash for snap, _ in recorded):
            rank_zero_info("RecordLineage: the final weights are in no checkpoint file; recorded without a path "
                           "(pass weights_path to save them)")
            recorded.append((final, None))
        recorded.sort(key=lambda item: item[0].step)
        ledger = Ledger(self.ledger_url)
        try:
            for snap, path in recorded:
                self.versions.append(ledger.record_version(
                    self._source, snap.weights_sha256, snap.trained, checkpoint_path=path, parent_id=self._parent,
                    kind="fit", started_at=self._started,
                    details={"global_step": snap.step, "epochs": trainer.current_epoch, "module": type(pl_module).__name__}))
        finally:
            ledger.close()
        self.timings_s["end"] = time.perf_counter() - t0
        rank_zero_info(f"RecordLineage: recorded model version(s) {self.versions} of source {self.source_name!r}")

    # -- which samples were drawn -------------------------------------------------------
    def _close_epoch(self) -> None:
        loader = self._loader
        if loader is None:
            return
        try:
            total = len(loader)
        except TypeError:
            total = None
        if total is not None and self._epoch_batches >= total:
            self._complete_epoch = True
        self._most_batches = max(self._most_batches, self._epoch_batches)

    def _drawn(self, mid_epoch: bool = False) -> np.ndarray:
        """Sorted dataset indices drawn so far (see the class docstring for when this is exact)."""
        loader, universe = self._loader, self._universe
        if loader is None:
            return universe
        most = max(self._most_batches, self._epoch_batches if mid_epoch else 0)
        sampler = loader.sampler
        drop_last = bool(getattr(loader.batch_sampler, "drop_last", loader.drop_last))
        visits_all = (isinstance(sampler, RandomSampler) and not sampler.replacement
                      and sampler.num_samples == len(sampler.data_source)) or isinstance(
            sampler, (SequentialSampler, DistributedSampler))
        if self._complete_epoch and visits_all and not drop_last:
            return universe
        if isinstance(sampler, SequentialSampler) and loader.batch_size:
            positions = np.arange(min(len(universe), most * loader.batch_size))
            dataset_order = _subset_order(loader.dataset)
            return np.unique(dataset_order[positions])
        if most == 0:
            return np.zeros(0, dtype=np.int64)
        return universe


def _subset_order(dataset) -> np.ndarray:
    """Base-dataset index of each position of ``dataset`` (positions are what a sampler yields)."""
    base, indices = base_dataset(dataset)
    return np.arange(len(base), dtype=np.int64) if indices is None else indices


def _checkpoint_files(trainer: pl.Trainer, since: float) -> list[str]:
    """Checkpoint files the fit's ModelCheckpoint callbacks still keep: named by them, or written in their folder since ``since``.

    (Without a monitored metric ModelCheckpoint does not list every file it keeps; the caller
    matches each file's weights hash against this fit's saves, so older files never match.)
    """
    paths: list[str] = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            paths += [*cb.best_k_models, cb.best_model_path, cb.last_model_path]
            if cb.dirpath and os.path.isdir(cb.dirpath):
                paths += sorted(str(p) for p in Path(cb.dirpath).glob(f"*{cb.FILE_EXTENSION}")
                                if p.stat().st_mtime >= since)
    seen, out = set(), []
    for p in paths:
        if p and p not in seen and os.path.isfile(p):
            seen.add(p)
            out.append(p)
    return out


def record_federated(
    ledger: Ledger | str,
    source_name: str,
    datamodule: Any,
    history: Sequence[Mapping[str, Any]],
    model: nn.Module,
    checkpoint_path: str | os.PathLike | None = None,
    parent_version: int | None = None,
    subjects: str | Mapping[int, str] | Sequence[str | None] | None = None,
) -> int:
    """Record a FedAvg-trained model: its clients (rounds each took part in) and their samples.

    ``datamodule`` is the :class:`~lightning_unlearn.data.FederatedDataModule` (its partition gives
    each sample's client), ``history`` the ``FedAvgResult.history`` (each row's ``clients``).
    Every sample of a client that took part in a round is recorded as reached. Returns the version id.
    """
    own = not isinstance(ledger, Ledger)
    ledger = Ledger(ledger) if own else ledger
    try:
        datamodule.setup("fit")
        train = datamodule.train_dataset
        clients: list[int | None] = [None] * len(train)
        shards = {k: np.asarray(datamodule.client_indices(k), dtype=np.int64) for k in range(datamodule.num_clients)}
        for k, idx in shards.items():
            for i in idx.tolist():
                clients[i] = k
        rounds: dict[int, int] = {}
        for row in history:
            for k in row.get("clients", []):
                rounds[int(k)] = rounds.get(int(k), 0) + 1
        unknown = sorted(set(rounds) - set(shards))
        if unknown:
            raise ValueError(f"history names client(s) {unknown} that the data module does not have "
                             f"(0..{datamodule.num_clients - 1})")
        reached = np.concatenate([shards[k] for k in rounds]) if rounds else np.zeros(0, dtype=np.int64)
        source = ledger.register_source(source_name, sample_hashes(train), subject_list(subjects, len(train)), clients)
        return ledger.record_version(
            source, weights_sha256(model), reached, checkpoint_path=checkpoint_path, parent_id=parent_version,
            clients=rounds, kind="fedavg", details={"rounds": len(history)})
    finally:
        if own:
            ledger.close()
