"""SISA training and exact deletion on Lightning (Bourtoule et al., "Machine Unlearning", S&P 2021).

A run directory holds::

    plan.json                 settings, model fingerprint, the data order ([shard][slice] -> sample ids)
    shard_007/state.json      deleted ids, per-slice checkpoint file + SHA-256 + SHA-256 of the data it saw
    shard_007/slice_002.g1.pt model + optimizer state after slice 2 (generation 1 = after one deletion)
    reports/deletion*.json    one report per deletion request

Each shard is written only by the process training it, so shards can train in parallel
(one process per device, ``SISA.fit(shards=[k])``). A deletion retrains an affected shard from
the last checkpoint before the first slice holding a deleted sample; other shards' files are
not touched. Before a checkpoint is reused its file hash and the hash of the data it was
trained on (ids, order, content) are checked against the current dataset.

A deletion holds every shard's lock (:mod:`~lightning_unlearn.exact.locks`), checks every file it
will read before any work, writes its new checkpoints under new names and commits the shard
states only once all of them (and the evaluation) succeeded: two deletions at once both land,
and one that fails leaves the run as it was, so rerunning it removes the samples.
"""
from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn._io import load_torch_file, save_torch, to_jsonable, unique_path, write_json
from lightning_unlearn._training import fit, quiet_lightning
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.exact.ensemble import SISAEnsemble
from lightning_unlearn.exact.locks import ShardLocks
from lightning_unlearn.exact.plan import (
    SISAConfig,
    file_sha256,
    ids_digest,
    init_seed,
    remaining,
    sample_digests,
    shard_slices,
    stage_seed,
)
from lightning_unlearn.request import ForgetRequest

log = logging.getLogger(__name__)
FORMAT = "lightning-unlearn/sisa/1"
PLAN_KEYS = ("format", "config", "num_samples", "model", "order")
CHECKPOINT_NAME = re.compile(r"slice_\d{3}\.g\d+\.pt")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class SISADeletion:
    """What one exact deletion did: affected shards, the retraining time, hashes before and after."""

    request: ForgetRequest
    sample_ids: np.ndarray  # every sample id the request resolves to
    affected: dict[int, dict[str, Any]]  # shard -> first retrained slice, samples removed, seconds
    seconds: float
    checkpoints_before: dict[int, list[str]]
    checkpoints_after: dict[int, list[str]]
    metrics: dict[str, Any] = field(default_factory=dict)
    report_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "sisa",
            "exact": True,
            "request": self.request.to_dict(),
            "num_samples_removed": int(sum(a["samples_removed"] for a in self.affected.values())),
            "num_samples_requested": int(len(self.sample_ids)),
            "affected_shards": {str(k): v for k, v in self.affected.items()},
            "timings_s": {"retrain_shards": self.seconds},
            "checkpoint_sha256_before": {str(k): v for k, v in self.checkpoints_before.items()},
            "checkpoint_sha256_after": {str(k): v for k, v in self.checkpoints_after.items()},
            "metrics": self.metrics,
        }


class SISA:
    """A SISA run over ``train_dataset`` in ``root``: ``fit`` the shards, ``forget`` requests exactly, ``ensemble``.

    Args:
        model_factory: builds one fresh shard model (a LightningModule returning class logits);
            it is called under a per-shard seed, so its random initialisation is reproducible.
        groups: optional client id per training sample; client requests delete that client's samples.
        trainer_kwargs: extra ``Trainer`` arguments for every slice (``accelerator``, ``devices``,
            ``deterministic``...); they do not enter the plan.
    """

    def __init__(
        self,
        root: str | Path,
        model_factory: Callable[[], pl.LightningModule],
        train_dataset: Dataset,
        config: SISAConfig | None = None,
        groups: Sequence[int] | np.ndarray | None = None,
        trainer_kwargs: dict | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config or SISAConfig()
        self.model_factory = model_factory
        self.dataset = train_dataset
        self.targets = dataset_targets(train_dataset)
        n = len(self.targets)
        self.groups = None if groups is None else np.asarray(groups)
        if self.groups is not None and (self.groups.shape != (n,) or not np.issubdtype(self.groups.dtype, np.integer)):
            raise ValueError(f"groups must be one integer client id per training sample ({n}), "
                             f"got shape {self.groups.shape} dtype {self.groups.dtype}")
        c = self.config
        self.slices = shard_slices(n, c.shards, c.slices, c.seed)
        self.location = np.empty((n, 2), dtype=np.int64)  # sample id -> (shard, slice)
        for s, shard in enumerate(self.slices):
            for j, ids in enumerate(shard):
                self.location[ids] = (s, j)
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self._digests: list[bytes] | None = None
        self._locks = ShardLocks(self.root)
        self._open_plan()

    # -- plan and shard state ------------------------------------------------------------------
    def _plan(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": self.config.training_dict(),
            "aggregation": self.config.aggregation,
            "num_samples": len(self.targets),
            "model": self._model_fingerprint(),
            "order": [[ids.tolist() for ids in shard] for shard in self.slices],
        }

    def _model_fingerprint(self) -> dict[str, Any]:
        model = self._new_model(0)
        hparams = dict(getattr(model, "hparams", {}) or {})
        return {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "hparams": to_jsonable(hparams),
            "parameters": {k: list(v.shape) for k, v in model.state_dict().items()},
        }

    def _open_plan(self) -> None:
        path = self.root / "plan.json"
        plan = to_jsonable(self._plan())
        if not path.exists():
            try:
                write_json(plan, path, overwrite=False)
                return
            except FileExistsError:  # another shard process wrote it first: it must agree
                pass
        stored = _read_plan(path)
        for key in PLAN_KEYS:
            if stored.get(key) != plan[key]:
                there, now = stored.get(key), plan[key]
                if isinstance(there, dict) and isinstance(now, dict):
                    keys = sorted(k for k in set(there) | set(now) if there.get(k) != now.get(k))
                    there, now = ({k: d.get(k) for k in keys} for d in (there, now))
                what = "data order" if key == "order" else key
                raise ValueError(
                    f"{self.root} holds a SISA run with a different {what} "
                    f"({_short(there)} there, {_short(now)} now): "
                    f"use the same settings and data, or start fresh in a new directory"
                )

    @staticmethod
    def stored_config(root: str | Path) -> SISAConfig | None:
        """The settings of the run in ``root`` (None if there is none yet)."""
        path = Path(root) / "plan.json"
        if not path.exists():
            return None
        stored = _read_plan(path)
        try:
            return SISAConfig(**stored["config"], aggregation=stored.get("aggregation", "mean_proba"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"SISA plan {path} is malformed: config {_short(stored['config'])} ({err})") from None

    def _shard_dir(self, shard: int) -> Path:
        return self.root / f"shard_{shard:03d}"

    def shard_state(self, shard: int) -> dict[str, Any]:
        """The shard's recorded state: ``deleted`` ids, ``generation`` and the trained ``stages``.

        The file is untrusted: a state that is not valid JSON or not a shard state of this plan
        raises one ValueError naming the file and what is wrong.
        """
        path = self._shard_dir(shard) / "state.json"
        if not path.exists():
            return {"shard": shard, "generation": 0, "deleted": [], "stages": []}
        state = _read_json(path, "SISA shard state")
        problem = self._state_problem(shard, state)
        if problem:
            raise ValueError(f"SISA shard state {path} is malformed: {problem}; restore it, or start fresh in a "
                             "new directory")
        return state

    def lock(self):
        """Hold every shard's lock (a context manager, reentrant in this thread): no other fit or deletion meanwhile.

        For work that must see the run unchanged from start to end, such as serving a ledger job
        (the ledger's head must be this run's ensemble when the job is claimed and when it is recorded).
        """
        return self._locks.hold(range(self.config.shards))

    def _state_problem(self, shard: int, state: Any) -> str | None:
        """What makes ``state`` unusable as shard ``shard``'s state (None if nothing)."""
        if not isinstance(state, dict):
            return f"expected a JSON object, got {type(state).__name__}"
        missing = [k for k in ("generation", "deleted", "stages") if k not in state]
        if missing:
            return f"it lacks {', '.join(missing)}"
        if state.get("shard", shard) != shard:
            return f"it names shard {state['shard']!r}, not {shard}"
        if not _is_int(state["generation"]) or state["generation"] < 0:
            return f"generation must be an integer >= 0, got {_short(state['generation'])}"
        deleted, n = state["deleted"], len(self.targets)
        if not isinstance(deleted, list) or not all(_is_int(i) and 0 <= i < n for i in deleted):
            return f"deleted must be a list of sample ids in 0..{n - 1}, got {_short(deleted)}"
        foreign = [i for i in deleted if self.location[i, 0] != shard]
        if foreign:
            return f"deleted lists sample(s) {_short(foreign)} that shard {shard} does not hold"
        stages = state["stages"]
        if not isinstance(stages, list) or len(stages) > self.config.slices:
            return f"stages must be a list of at most {self.config.slices} slice checkpoints"
        for j, stage in enumerate(stages):
            if not isinstance(stage, dict) or stage.get("slice") != j:
                return f"stage {j} must be an object with slice {j}"
            if not isinstance(stage.get("file"), str) or not CHECKPOINT_NAME.fullmatch(stage["file"]):
                return f"stage {j}: file must be a checkpoint name like slice_000.g0.pt, got {_short(stage.get('file'))}"
            for key in ("sha256", "data_sha256"):
                if not isinstance(stage.get(key), str) or not SHA256.fullmatch(stage[key]):
                    return f"stage {j}: {key} must be a SHA-256 hex digest"
            if not _is_int(stage.get("samples")) or stage["samples"] < 0:
                return f"stage {j}: samples must be an integer >= 0"
        return None

    def _write_state(self, shard: int, state: dict[str, Any]) -> None:
        write_json(state, self._shard_dir(shard) / "state.json")

    def _sweep(self, shard: int, state: dict[str, Any]) -> None:
        """Remove checkpoint files the state no longer references (superseded by a deletion, or half-written)."""
        keep = {st["file"] for st in state["stages"]}
        folder = self._shard_dir(shard)
        if not folder.exists():
            return
        for path in folder.iterdir():
            stale_ckpt = path.name.startswith("slice_") and path.suffix == ".pt" and path.name not in keep
            if stale_ckpt or (path.name.startswith(".slice_") and path.name.endswith(".tmp")):
                path.unlink()

    @property
    def digests(self) -> list[bytes]:
        if self._digests is None:
            self._digests = sample_digests(self.dataset)
        return self._digests

    def stage_ids(self, shard: int, slice_: int, deleted: set[int]) -> np.ndarray:
        """The samples stage ``(shard, slice_)`` trains on: slices ``0..slice_`` minus ``deleted``, in order."""
        parts = [remaining(ids, deleted) for ids in self.slices[shard][: slice_ + 1]]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    # -- training ------------------------------------------------------------------------------
    def _check_shards(self, shards: Sequence[int] | None) -> list[int]:
        allowed = range(self.config.shards)
        if shards is None:
            return list(allowed)
        bad = [s for s in shards if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in allowed]
        if bad:
            raise ValueError(f"shard id(s) {bad} out of range; allowed ids are 0..{self.config.shards - 1}")
        return sorted(set(int(s) for s in shards))

    def fit(self, shards: Sequence[int] | None = None, exclude: Sequence[int] = ()) -> dict[int, float]:
        """Train the given shards (default: all); returns seconds per shard.

        Verified stages already on disk are kept (an interrupted run resumes); a checkpoint whose
        file or training data no longer matches raises a ValueError. ``exclude``: sample ids that
        untrained shards treat as deleted from the start (the from-scratch run a deletion must equal).
        """
        shards = self._check_shards(shards)
        exclude_ids = np.unique(np.asarray(list(exclude), dtype=np.int64))
        if len(exclude_ids) and not (0 <= exclude_ids.min() and exclude_ids.max() < len(self.targets)):
            raise ValueError(f"exclude ids out of range; allowed ids are 0..{len(self.targets) - 1}")
        seconds = {}
        for s in shards:
            with self._locks.hold([s]):  # one process per shard; a deletion waits for it
                seconds[s] = self._fit_shard(s, exclude_ids)
        return seconds

    def _fit_shard(self, s: int, exclude_ids: np.ndarray) -> float:
        state = self.shard_state(s)
        self._sweep(s, state)
        excluded = set(exclude_ids[self.location[exclude_ids, 0] == s].tolist())
        if excluded - set(state["deleted"]):
            if state["stages"]:
                raise ValueError(f"shard {s} is already trained: delete samples from it with forget(), not exclude=")
            state = {**state, "deleted": sorted(excluded)}
        deleted = set(state["deleted"])
        done = len(state["stages"])
        start = time.perf_counter()
        if done < self.config.slices:
            model, opt_state = self._resume(s, state, done, deleted)
            self._train_stages(s, done, model, opt_state, deleted, state, write_each=True)
        seconds = time.perf_counter() - start
        log.info("SISA shard %d: %d slices trained in %.1f s", s, self.config.slices - done, seconds)
        return seconds

    def _new_model(self, shard: int) -> pl.LightningModule:
        with torch.random.fork_rng(devices=[]):
            pl.seed_everything(init_seed(self.config.seed, shard), verbose=False)
            model = self.model_factory()
        if not isinstance(model, pl.LightningModule):
            raise ValueError(f"model_factory must return a LightningModule, got {type(model).__name__}")
        return model

    def _load_stage(self, shard: int, stage: dict[str, Any], deleted: set[int]) -> dict[str, Any]:
        """A recorded stage checkpoint, after checking its file hash and the hash of the data it saw."""
        return load_torch_file(self._verify_stage(shard, stage, deleted), "SISA checkpoint")

    def _verify_stage(self, shard: int, stage: dict[str, Any], deleted: set[int]) -> Path:
        path = self._shard_dir(shard) / stage["file"]
        if not path.is_file():
            raise ValueError(f"checkpoint {path} is missing: start fresh in a new directory or run fit again")
        if file_sha256(path) != stage["sha256"]:
            raise ValueError(f"checkpoint {path} changed since it was written (SHA-256 mismatch): "
                             "refusing to reuse it; start fresh in a new directory")
        seen = ids_digest(self.stage_ids(shard, stage["slice"], deleted), self.digests)
        if seen != stage["data_sha256"]:
            raise ValueError(f"checkpoint {path} was trained on different data than shard {shard} slices 0..{stage['slice']} "
                             "hold now (the dataset changed): refusing to reuse a stale checkpoint; "
                             "start fresh in a new directory")
        return path

    def _resume(self, shard: int, state: dict[str, Any], start: int, deleted: set[int]):
        """Model and optimizer state to train slice ``start`` from: the verified checkpoint of ``start - 1``."""
        model = self._new_model(shard)
        for stage in state["stages"][: max(start - 1, 0)]:  # verify the whole prefix it rests on
            self._verify_stage(shard, stage, deleted)
        if start == 0:
            return model, None
        payload = self._load_stage(shard, state["stages"][start - 1], deleted)
        model.load_state_dict(payload["model"])
        return model, payload["optimizer_state"]

    def _train_stages(self, shard: int, start: int, model: pl.LightningModule, opt_state, deleted: set[int],
                      state: dict[str, Any], write_each: bool) -> dict[str, Any]:
        c = self.config
        stages = list(state["stages"][:start])
        generation = int(state["generation"])
        for j in range(start, c.slices):
            ids = self.stage_ids(shard, j, deleted)
            if len(ids):
                opt_state = self._train_stage(model, opt_state, ids, stage_seed(c.seed, shard, j))
            payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       "optimizer_state": opt_state}
            name = f"slice_{j:03d}.g{generation}.pt"
            path = save_torch(payload, self._shard_dir(shard) / name)
            stages.append({"slice": j, "file": name, "sha256": file_sha256(path),
                           "data_sha256": ids_digest(ids, self.digests), "samples": int(len(ids))})
            if write_each:
                state = {**state, "stages": stages}
                self._write_state(shard, state)
        return {**state, "stages": stages}

    def _train_stage(self, model: pl.LightningModule, opt_state, ids: np.ndarray, seed: int):
        """``epochs_per_slice`` epochs on ``ids`` with a fresh Trainer; the optimizer continues from ``opt_state``."""
        pl.seed_everything(seed, verbose=False)
        loader = DataLoader(Subset(self.dataset, ids.tolist()), batch_size=self.config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed), num_workers=0)
        keeper = _OptimizerState(opt_state)
        with quiet_lightning(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            fit(model, _LoaderData(loader), self.config.epochs_per_slice, [keeper],
                {"enable_model_summary": False, **self.trainer_kwargs})
        return keeper.captured

    # -- deletion ------------------------------------------------------------------------------
    def resolve(self, request: ForgetRequest) -> np.ndarray:
        """Sample ids a request deletes; fails fast on a request that does not fit the data."""
        if request.kind == "subject":
            raise ValueError("subject requests must be resolved to sample ids first (through the request ledger): "
                             "pass ForgetRequest(sample_ids=...)")
        if request.kind == "client":
            if self.groups is None:
                raise ValueError("a client request needs a client id per training sample: pass groups= to SISA "
                                 "(e.g. lightning_unlearn.exact.sisa.client_ids(federated_datamodule))")
            known = sorted(int(g) for g in np.unique(self.groups))
            bad = [c for c in request.clients if c not in known]
            if bad:
                raise ValueError(f"client id(s) {bad} unknown; allowed ids are {known}")
            return np.flatnonzero(request.resolve(self.targets, clients=self.groups))
        request.validate(self.targets)
        return np.flatnonzero(request.resolve(self.targets))

    def deleted_ids(self) -> np.ndarray:
        """Sorted ids of every sample deleted from the run so far."""
        with self._locks.hold(range(self.config.shards)):  # not half of a deletion
            parts = [self.shard_state(s)["deleted"] for s in range(self.config.shards)]
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    def held_ids(self) -> np.ndarray:
        """Sorted ids of the samples the current shard models were trained on (all but the deleted)."""
        return np.setdiff1d(np.arange(len(self.targets)), self.deleted_ids())

    def forget(self, request: ForgetRequest, test_dataset: Dataset | None = None,
               report_dir: str | Path | None = None) -> SISADeletion:
        """Delete ``request`` exactly: retrain each affected shard from its last unaffected checkpoint.

        Unaffected shards are not touched. With ``test_dataset`` the report carries the ensemble's
        forget / remaining / test accuracies; the report is written to ``report_dir``
        (default ``root/reports``). Holds every shard's lock: a concurrent deletion or fit waits.
        Nothing is committed until every affected shard is retrained (and evaluated): a failure
        leaves every shard state as it was.
        """
        ids = self.resolve(request)
        with self._locks.hold(range(self.config.shards)):
            return self._forget_locked(request, ids, test_dataset, report_dir)

    def _forget_locked(self, request: ForgetRequest, ids: np.ndarray, test_dataset: Dataset | None,
                       report_dir: str | Path | None) -> SISADeletion:
        states = {s: self.shard_state(s) for s in range(self.config.shards)}  # read under the lock, validated
        untrained = [s for s, st in states.items() if len(st["stages"]) < self.config.slices]
        if untrained:
            raise ValueError(f"shard(s) {untrained} are not fully trained in {self.root}: run fit first")
        all_deleted = set().union(*(st["deleted"] for st in states.values())) | set(ids.tolist())
        if len(all_deleted) >= len(self.targets):
            raise ValueError(f"{request.to_dict()} would delete every training sample: nothing would be retained")
        todo: dict[int, tuple[int, list[int]]] = {}  # shard -> (first slice to retrain, newly deleted ids)
        for s, state in states.items():
            mine = ids[self.location[ids, 0] == s]
            new = mine[~np.isin(mine, np.asarray(state["deleted"], dtype=np.int64))].tolist()
            if new:
                todo[s] = (int(self.location[new, 1].min()), new)
        # every checkpoint this deletion reads, checked before any work: the prefixes the affected
        # shards resume from, and (for the evaluation) the unaffected shards' served models
        for s, state in states.items():
            deleted = set(state["deleted"])
            if s in todo:
                for stage in state["stages"][: todo[s][0]]:
                    self._verify_stage(s, stage, deleted)
            elif test_dataset is not None:
                self._verify_stage(s, state["stages"][-1], deleted)
        for s, state in states.items():
            self._sweep(s, state)  # checkpoints an interrupted deletion left uncommitted
        affected, pending, before, after = {}, {}, {}, {}
        start = time.perf_counter()
        for s, (first, new) in todo.items():
            state = states[s]
            t0 = time.perf_counter()
            deleted = set(state["deleted"])
            model, opt_state = self._resume(s, state, first, deleted)
            deleted |= set(new)
            work = {**state, "generation": int(state["generation"]) + 1, "deleted": sorted(deleted)}
            pending[s] = self._train_stages(s, first, model, opt_state, deleted, work, write_each=False)
            before[s] = [st["sha256"] for st in state["stages"]]
            after[s] = [st["sha256"] for st in pending[s]["stages"]]
            affected[s] = {"first_slice": first, "slices_retrained": self.config.slices - first,
                           "samples_removed": len(new), "samples_left": pending[s]["stages"][-1]["samples"],
                           "seconds": time.perf_counter() - t0}
        result = SISADeletion(request, ids, affected, time.perf_counter() - start, before, after)
        if test_dataset is not None:  # the ensemble as it will be served, before anything is committed
            result.metrics = self._evaluate(request, ids, test_dataset, {**states, **pending})
        for s, work in pending.items():
            self._write_state(s, work)  # the new checkpoints count from here on
        for s, work in pending.items():
            self._sweep(s, work)  # the superseded ones (they saw the deleted data) go
        folder = Path(report_dir) if report_dir is not None else self.root / "reports"
        result.report_path = write_json(result.to_dict(), unique_path(folder / "deletion.json"), overwrite=False)
        log.info("SISA deletion %s: shards %s retrained in %.1f s", request.to_dict(), sorted(affected), result.seconds)
        return result

    def evaluate(self, request: ForgetRequest, ids: np.ndarray, test_dataset: Dataset) -> dict[str, Any]:
        """The ensemble's accuracy splits for a request (the same numbers the approximate reports carry)."""
        with self._locks.hold(range(self.config.shards)):
            states = {s: self.shard_state(s) for s in range(self.config.shards)}
            return self._evaluate(request, ids, test_dataset, states)

    def _evaluate(self, request: ForgetRequest, ids: np.ndarray, test_dataset: Dataset,
                  states: dict[int, dict[str, Any]]) -> dict[str, Any]:
        from lightning_unlearn.data.unlearning import UnlearningDataModule
        from lightning_unlearn.metrics import split_accuracies

        dm = UnlearningDataModule(self.dataset, test_dataset, request, batch_size=256, forget_indices=ids)
        return split_accuracies(self._ensemble_of(states), dm)

    # -- the model ----------------------------------------------------------------------------
    def shard_model(self, shard: int) -> pl.LightningModule:
        """Shard ``shard``'s current model (last slice), verified before use."""
        (shard,) = self._check_shards([shard])
        with self._locks.hold([shard]):
            state = self.shard_state(shard)
            if len(state["stages"]) < self.config.slices:
                raise ValueError(f"shard {shard} is not fully trained in {self.root}: run fit first")
            return self._model_of(shard, state)

    def _model_of(self, shard: int, state: dict[str, Any]) -> pl.LightningModule:
        model = self._new_model(shard)
        model.load_state_dict(self._load_stage(shard, state["stages"][-1], set(state["deleted"]))["model"])
        return model.eval()

    def ensemble(self, aggregation: str | None = None) -> SISAEnsemble:
        """All shard models with data left, as one LightningModule (read while no deletion is half done)."""
        with self._locks.hold(range(self.config.shards)):
            states = {s: self.shard_state(s) for s in range(self.config.shards)}
            untrained = [s for s, st in states.items() if len(st["stages"]) < self.config.slices]
            if untrained:
                raise ValueError(f"shard(s) {untrained} are not trained in {self.root}: run fit first "
                                 f"(e.g. lightning-unlearn sisa fit ... --sisa.shard_ids {untrained[0]})")
            return self._ensemble_of(states, aggregation)

    def _ensemble_of(self, states: dict[int, dict[str, Any]], aggregation: str | None = None) -> SISAEnsemble:
        live = [s for s, st in states.items() if st["stages"][-1]["samples"] > 0]
        models = [self._model_of(s, states[s]) for s in live]
        return SISAEnsemble(models, aggregation or self.config.aggregation, live).eval()

    def storage_bytes(self) -> int:
        """Bytes of the checkpoint files the run keeps (every shard x slice)."""
        total = 0
        with self._locks.hold(range(self.config.shards)):
            for s in range(self.config.shards):
                for stage in self.shard_state(s)["stages"]:
                    total += (self._shard_dir(s) / stage["file"]).stat().st_size
        return total


def client_ids(datamodule) -> np.ndarray:
    """Client id per training sample of a :class:`~lightning_unlearn.data.federated.FederatedDataModule`."""
    datamodule.setup()
    groups = np.full(len(datamodule.targets), -1, dtype=np.int64)
    for k in range(datamodule.num_clients):
        groups[datamodule.client_indices(k)] = k
    return groups


class _LoaderData(pl.LightningDataModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader:
        return self.loader


class _OptimizerState(Callback):
    """Continues the optimizers (and LR schedulers) from a slice checkpoint and captures them at the end."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        self.state = state
        self.captured: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is None:
            return
        optimizers, schedulers = self.state["optimizers"], self.state["lr_schedulers"]
        if len(optimizers) != len(trainer.optimizers) or len(schedulers) != len(trainer.lr_scheduler_configs):
            raise ValueError("the model's optimizers / schedulers differ from the ones in the slice checkpoint")
        for opt, sd in zip(trainer.optimizers, optimizers):
            opt.load_state_dict(sd)
        for cfg, sd in zip(trainer.lr_scheduler_configs, schedulers):
            cfg.scheduler.load_state_dict(sd)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.captured = {
            "optimizers": [_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
            "lr_schedulers": [_to_cpu(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        }


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _read_json(path: Path, what: str) -> Any:
    """A JSON file another process or a user may have damaged: errors name the file and the problem."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}); "
                         "restore it, or start fresh in a new directory") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} cannot be read ({getattr(err, 'strerror', None) or err})") from None


def _read_plan(path: Path) -> dict[str, Any]:
    plan = _read_json(path, "SISA plan")
    if not isinstance(plan, dict):
        raise ValueError(f"SISA plan {path} is malformed: expected a JSON object, got {type(plan).__name__}")
    missing = [k for k in PLAN_KEYS if k not in plan]
    if missing:
        raise ValueError(f"SISA plan {path} lacks {', '.join(missing)}: restore it, or start fresh in a new directory")
    if not isinstance(plan["config"], dict):
        raise ValueError(f"SISA plan {path} is malformed: config must be an object, got {_short(plan['config'])}")
    return plan


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
