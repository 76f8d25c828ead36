"""The SISA plan: which sample goes to which shard and slice, the seeds, and content hashes.

Everything here is a pure function of ``(num_samples, shards, slices, seed)`` and the data, so
two processes (or a from-scratch reference) always agree on the order. After deletions a
slice is its original list minus the deleted ids: later slices keep their order.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

AGGREGATIONS = ("mean_proba", "vote")
_INIT, _STAGE = 1, 2  # seed-sequence tags: model initialisation, slice training


@dataclass(frozen=True)
class SISAConfig:
    """Shards x slices and the training schedule of every stage.

    Stage ``(shard s, slice j)`` trains ``epochs_per_slice`` epochs on slices ``0..j`` of shard
    ``s`` (the original slices minus deleted samples), starting from the checkpoint of stage
    ``j - 1`` (model and optimizer state). With ``slices=R``, ``epochs_per_slice = 2E / (R + 1)``
    gives the same number of sample passes as ``E`` epochs without slicing (Bourtoule et al.).
    """

    shards: int = 5
    slices: int = 1
    epochs_per_slice: int = 5
    batch_size: int = 64
    seed: int = 0
    aggregation: str = "mean_proba"

    def __post_init__(self) -> None:
        for name in ("shards", "slices", "epochs_per_slice", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; allowed values are {list(AGGREGATIONS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def training_dict(self) -> dict:
        """The settings a checkpoint depends on (aggregation only matters at prediction time)."""
        return {k: v for k, v in asdict(self).items() if k != "aggregation"}


def shard_slices(num_samples: int, shards: int, slices: int, seed: int) -> list[list[np.ndarray]]:
    """``[shard][slice] -> sample ids`` in training order: one seeded permutation, split evenly."""
    if shards * slices > num_samples:
        raise ValueError(
            f"shards x slices = {shards} x {slices} = {shards * slices} is more than the {num_samples} training "
            f"samples; allowed: shards x slices <= {num_samples}"
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.array_split(part, slices) for part in np.array_split(order, shards)]


def stage_seed(seed: int, shard: int, slice_: int) -> int:
    """Seed of stage ``(shard, slice)``: global RNGs and the loader's shuffle order."""
    return int(np.random.SeedSequence([seed, _STAGE, shard, slice_]).generate_state(1)[0])


def init_seed(seed: int, shard: int) -> int:
    """Seed under which shard ``shard``'s model is constructed (its initial weights)."""
    return int(np.random.SeedSequence([seed, _INIT, shard]).generate_state(1)[0])


def sample_digests(dataset: Dataset, batch_size: int = 1024) -> list[bytes]:
    """SHA-256 of every sample's input and label, in dataset order.

    Reads ``TensorDataset`` tensors directly; otherwise the items themselves (a dataset with
    random transforms hashes differently on every read, so checkpoints would never be reused).
    """
    if isinstance(dataset, TensorDataset):
        batches: Iterable = (tuple(t[i : i + batch_size] for t in dataset.tensors) for i in range(0, len(dataset), batch_size))
    else:
        batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out: list[bytes] = []
    for batch in batches:
        parts = [p if isinstance(p, torch.Tensor) else torch.as_tensor(p) for p in batch]
        parts = [p.detach().cpu().contiguous() for p in parts]
        rows = [[p[i].numpy().tobytes() for i in range(len(p))] for p in parts]
        shapes = "|".join(f"{p.dtype}{tuple(p.shape[1:])}" for p in parts).encode()
        for items in zip(*rows):
            h = hashlib.sha256(shapes)
            for item in items:
                h.update(len(item).to_bytes(8, "little"))
                h.update(item)
            out.append(h.digest())
    if len(out) != len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"hashed {len(out)} samples but the dataset has {len(dataset)}")  # type: ignore[arg-type]
    return out


def ids_digest(ids: Sequence[int], digests: Sequence[bytes]) -> str:
    """SHA-256 of ``(id, sample digest)`` in order: what one stage trained on, and in which order."""
    h = hashlib.sha256()
    for i in ids:
        h.update(int(i).to_bytes(8, "little"))
        h.update(digests[int(i)])
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remaining(slice_ids: np.ndarray, deleted: set[int]) -> np.ndarray:
    """A slice after deletions: its original order minus the deleted ids."""
    if not deleted:
        return slice_ids
    return slice_ids[~np.isin(slice_ids, np.fromiter(deleted, dtype=np.int64, count=len(deleted)))]
