"""Reference models for per-example attacks, trained once and cached on disk.

A per-example membership attack needs populations of models: models retrained from scratch
on the retain data (they never saw the forget samples: the "out" population) and, for the
challenge score, the unlearning method run on several independently trained originals (the
"unlearned" population). Training them is the whole cost of the evaluation, so every model
is cached under ``<cache_dir>/<kind>/<key>/<kind>_<i>.pt``, where ``key`` is a SHA-256 of
everything that determines it: the data (a content hash), the split (forget, retain and
audit index arrays), the model's class, hyper-parameters and architecture, the training
schedule (epochs, batch size, trainer settings) and the seed. A second evaluation of another
method on the same request trains nothing; a changed split, hyper-parameter or schedule gets
a new key and is trained afresh, never confused with an old file.

Each model is an independent Lightning run (``Trainer.fit`` with your ``trainer_kwargs``, so
``accelerator``/``devices`` apply). To spread K models over several GPUs or machines, start
one process per GPU with the same ``cache_dir`` (a shared file system) and ``indices=`` a
disjoint slice of ``range(K)`` (e.g. ``range(j, K, P)`` in process ``j`` of ``P``), with
``trainer_kwargs={"devices": [j]}``; files are written atomically, so a final call with all
indices only loads them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_unlearn._io import load_torch_file, save_torch, write_json
from lightning_unlearn._training import SeededData, fit, quiet_lightning, reinitialize
from lightning_unlearn.data.unlearning import UnlearningDataModule

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
UnlearnFn = Callable[[nn.Module, Any, int], nn.Module]


# -- keys ---------------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of a dataset's contents (tensors directly; other datasets item by item)."""
    h = hashlib.sha256()
    _hash_dataset(dataset, h)
    return h.hexdigest()


def _hash_dataset(dataset: Dataset, h) -> None:
    if isinstance(dataset, Subset):
        h.update(b"subset")
        h.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        _hash_dataset(dataset.dataset, h)
    elif isinstance(dataset, ConcatDataset):
        h.update(b"concat")
        for part in dataset.datasets:
            _hash_dataset(part, h)
    elif isinstance(dataset, TensorDataset):
        h.update(b"tensors")
        for t in dataset.tensors:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    else:  # a generic map-style dataset: every item (one pass over the data)
        h.update(type(dataset).__qualname__.encode())
        for i in range(len(dataset)):  # type: ignore[arg-type]
            for part in dataset[i][:2]:
                h.update(torch.as_tensor(part).detach().cpu().contiguous().numpy().tobytes())


def model_description(model: nn.Module) -> dict[str, Any]:
    """Class, hyper-parameters and architecture: what makes two models 'the same recipe'."""
    hparams = getattr(model, "hparams", None)
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "hparams": _plain(dict(hparams)) if hparams else None,
        "architecture": repr(model),
    }


def _plain(value: Any) -> Any:
    """JSON-able stand-in for settings (objects become their type and repr)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"{type(value).__qualname__}:{value!r}"


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``parts``."""
    text = json.dumps(_plain({"format": CACHE_FORMAT, **parts}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def index_hash(indices: Sequence[int] | np.ndarray) -> str:
    """SHA-256 of an index array (the split, without writing thousands of ids into the key file)."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


def derived_seed(kind: str, seed: int, index: int) -> int:
    """Independent seed per (population, seed, member): no reference shares an init with the original."""
    digest = hashlib.sha256(f"{kind}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# -- training data ------------------------------------------------------------------
def audit_indices(datamodule: UnlearningDataModule, size: int, seed: int) -> np.ndarray:
    """A seeded sample of retain-set positions (training-set indices) that no reference trains on.

    They are members of the original and the unlearned model but not of the references, so the
    same attack measures their exposure before and after unlearning. At most 10% of the retain set.
    """
    retain = np.asarray(datamodule.retain_indices)
    size = min(int(size), len(retain) // 10)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(derived_seed("audit", seed, 0))
    return np.sort(rng.choice(retain, size=size, replace=False)).astype(np.int64)


def _check(k: int, epochs: int, indices: Iterable[int] | None) -> list[int]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of reference models must be an integer >= 1, got {k!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    wanted = list(range(k)) if indices is None else sorted(set(int(i) for i in indices))
    bad = [i for i in wanted if not 0 <= i < k]
    if bad:
        raise ValueError(f"reference indices {bad} are out of range; allowed are 0..{k - 1}")
    return wanted


def _schedule(datamodule, epochs: int, trainer_kwargs: dict | None) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": int(datamodule.batch_size), "trainer_kwargs": _plain(trainer_kwargs or {})}


# -- the cache ----------------------------------------------------------------------
@dataclass(frozen=True)
class Population:
    """K cached models of one kind and their cache folder (``key`` names everything they depend on)."""

    models: list[nn.Module]
    key: str
    folder: Path
    trained: int  # how many of them this call trained (0 = every one came from the cache)


def _build(
    kind: str,
    template: nn.Module,
    parts: Mapping[str, Any],
    k: int,
    indices: list[int],
    cache_dir: str | Path,
    make: Callable[[int, int], nn.Module],
    progress: bool,
) -> Population:
    key = cache_key({"kind": kind, **parts})
    folder = Path(cache_dir) / kind / key
    meta = folder / "key.json"
    if not meta.exists():
        write_json({"kind": kind, "key": key, **_plain(dict(parts))}, meta)
    models, trained = [], 0
    todo = [i for i in indices if not (folder / f"{kind}_{i}.pt").exists()]
    with _progress(progress, f"{kind}: training {len(todo)} of {len(indices)}", len(todo)) as advance:
        for i in indices:
            path = folder / f"{kind}_{i}.pt"
            if path.exists():
                models.append(_load(template, path, key, i))
                continue
            member_seed = derived_seed(kind, int(parts["seed"]), i)
            model = make(i, member_seed).cpu().eval()
            save_torch({"key": key, "index": i, "seed": member_seed, "state_dict": model.state_dict()}, path)
            models.append(model)
            trained += 1
            advance()
    log.info("%s population %s: %d models (%d trained, %d cached)", kind, key[:12], len(models), trained,
             len(models) - trained)
    return Population(models, key, folder, trained)


def _load(template: nn.Module, path: Path, key: str, index: int) -> nn.Module:
    blob = load_torch_file(path, "reference model")
    if not isinstance(blob, dict) or blob.get("key") != key or blob.get("index") != index:
        raise ValueError(f"reference model {path} does not belong to cache key {key[:12]} index {index}; "
                         "delete it and run again")
    model = copy.deepcopy(template).cpu()
    model.load_state_dict(blob["state_dict"])
    return model.eval()


class _progress:
    """A rich progress bar on stderr (or nothing); yields ``advance()``."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total, self._bar = enabled and total > 0, label, total, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _train_fresh(template: nn.Module, dataset: Dataset, datamodule, epochs: int, trainer_kwargs, seed: int) -> nn.Module:
    model = reinitialize(copy.deepcopy(template).cpu(), seed).train()
    torch.manual_seed(seed)
    data = SeededData(dataset, int(datamodule.batch_size), seed, int(getattr(datamodule, "num_workers", 0)))
    with quiet_lightning():
        fit(model, data, epochs, trainer_kwargs=trainer_kwargs)
    return model


def _recipe(template: nn.Module, datamodule: UnlearningDataModule, epochs: int, trainer_kwargs: dict | None,
            seed: int) -> dict[str, Any]:
    """What every cached population's key holds: the data, the architecture, the schedule and the seed."""
    return {"data": dataset_fingerprint(datamodule.train_dataset), "model": model_description(template),
            "schedule": _schedule(datamodule, epochs, trainer_kwargs), "seed": seed}


def train_references(
    template: nn.Module,
    datamodule: UnlearningDataModule,
    k: int,
    epochs: int,
    trainer_kwargs: dict | None = None,
    cache_dir: str | Path = "outputs/references",
    seed: int = 0,
    exclude: Sequence[int] | np.ndarray = (),
    indices: Iterable[int] | None = None,
    progress: bool = True,
) -> Population:
    """K models trained from scratch on ``datamodule``'s retain set (minus ``exclude``), cached.

    ``template`` gives the architecture (a copy is re-initialised with each member's seed);
    ``datamodule`` is an :class:`~lightning_unlearn.UnlearningDataModule` (its ``batch_size``
    is the training batch size). ``exclude``: training-set indices the references must not
    see (the retain audit sample, see :func:`audit_indices`). ``indices``: train or load only
    these members (one process per GPU, see the module docstring).
    """
    wanted = _check(k, epochs, indices)
    exclude = np.asarray(sorted(int(i) for i in exclude), dtype=np.int64)
    retain = np.setdiff1d(np.asarray(datamodule.retain_indices, dtype=np.int64), exclude)
    parts = {**_recipe(template, datamodule, epochs, trainer_kwargs, seed),
             "forget": index_hash(datamodule.forget_indices), "train_on": index_hash(retain)}
    dataset = Subset(datamodule.train_dataset, retain.tolist())
    make = lambda i, s: _train_fresh(template, dataset, datamodule, epochs, trainer_kwargs, s)  # noqa: E731
    return _build("reference", template, parts, k, wanted, cache_dir, make, progress)


def train_originals(
    template: nn.Module,
    datamodule: UnlearningDataModule,
    k: int,
    epochs: int,
    trainer_kwargs: dict | None = None,
    cache_dir: str | Path = "outputs/references",
    seed: int = 0,
    indices: Iterable[int] | None = None,
    progress: bool = True,
) -> Population:
    """K models trained from scratch on all training data (independent "originals"), cached.

    The key does not depend on the request, so every request on the same data shares them.
    """
    wanted = _check(k, epochs, indices)
    parts = _recipe(template, datamodule, epochs, trainer_kwargs, seed)
    make = lambda i, s: _train_fresh(template, datamodule.train_dataset, datamodule, epochs, trainer_kwargs, s)  # noqa: E731
    return _build("original", template, parts, k, wanted, cache_dir, make, progress)


def unlearned_population(
    template: nn.Module,
    datamodule: UnlearningDataModule,
    unlearn_fn: UnlearnFn,
    method: str,
    settings: Mapping[str, Any],
    k: int,
    epochs: int,
    trainer_kwargs: dict | None = None,
    cache_dir: str | Path = "outputs/references",
    seed: int = 0,
    indices: Iterable[int] | None = None,
    progress: bool = True,
) -> Population:
    """``unlearn_fn(original_i, datamodule, seed_i)`` on each of K cached originals, cached by method and settings.

    ``method`` and ``settings`` name the unlearning recipe in the cache key: change either (or
    the request, the data, the originals' recipe) and the population is rebuilt. ``epochs`` and
    ``trainer_kwargs`` are the originals' training schedule.
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty name of the unlearning recipe, got {method!r}")
    wanted = _check(k, epochs, indices)
    originals = train_originals(template, datamodule, k, epochs, trainer_kwargs, cache_dir, seed, wanted, progress)
    by_index = dict(zip(wanted, originals.models))
    parts = {
        "originals": originals.key,
        "forget": index_hash(datamodule.forget_indices),
        "data": dataset_fingerprint(datamodule.train_dataset),
        "method": method,
        "settings": _plain(dict(settings)),
        "seed": seed,
    }

    def make(i: int, s: int) -> nn.Module:
        with quiet_lightning():
            out = unlearn_fn(copy.deepcopy(by_index[i]), datamodule, s)
        return getattr(out, "model", out)  # an UnlearningResult or the model itself

    return _build(f"unlearned-{_slug(method)}", template, parts, k, wanted, cache_dir, make, progress)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]
