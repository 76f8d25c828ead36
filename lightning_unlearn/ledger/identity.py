"""Sample identities: content hashes of a dataset's samples and who (subject, client) each belongs to."""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

SubjectsArg = str | os.PathLike | Mapping[int, str] | Sequence[str | None] | None


def base_dataset(dataset: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """The dataset a (possibly nested) ``Subset`` indexes into, and the indices into it (None: all of it)."""
    indices: np.ndarray | None = None
    while isinstance(dataset, Subset):
        own = np.asarray(dataset.indices, dtype=np.int64)
        indices = own if indices is None else own[indices]
        dataset = dataset.dataset
    return dataset, indices


def sample_hashes(dataset: Dataset) -> list[str]:
    """SHA-256 per sample over its input's dtype, shape and bytes and its label (int64), in index order.

    Tensor datasets (``TensorDataset``, or torchvision-style ``.data`` + ``.targets``: the raw,
    untransformed samples) are hashed from their stacked tensors, one row view per sample;
    other datasets item by item (a random transform would make those hashes change between runs).
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _hash_rows(dataset.tensors[0], dataset.tensors[1])
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is not None and targets is not None and len(data) == len(targets):
        return _hash_rows(torch.as_tensor(np.asarray(data)), torch.as_tensor(np.asarray(targets)))
    out = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"cannot hash sample {i} of {type(dataset).__name__}: items must be (input, label) pairs")
        out += _hash_rows(torch.as_tensor(item[0])[None], torch.as_tensor([int(item[1])]))
    return out


def _hash_rows(inputs: torch.Tensor, labels: torch.Tensor) -> list[str]:
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels: cannot hash the samples")
    x = inputs.detach().cpu().contiguous()
    prefix = hashlib.sha256(f"{x.dtype}|{tuple(x.shape[1:])}|".encode())
    rows = x.reshape(len(x), -1).view(torch.uint8).numpy() if x.numel() else np.zeros((len(x), 0), np.uint8)
    y = labels.detach().cpu().long().numpy().astype("<i8")
    out = []
    for row, label in zip(rows, y):
        h = prefix.copy()
        h.update(row.data)
        h.update(label.tobytes())
        out.append(h.hexdigest())
    return out


def demo_subjects(num_samples: int, num_subjects: int = 100, seed: int = 0) -> list[str]:
    """A deterministic stand-in for real data subjects: each sample belongs to one of ``user-0`` ... ``user-{n-1}``."""
    if num_subjects < 1 or num_subjects > num_samples:
        raise ValueError(f"num_subjects must be in 1..{num_samples}, got {num_subjects}")
    owner = np.random.default_rng(seed).permutation(num_samples) % num_subjects
    return [f"user-{k}" for k in owner]


def read_subjects(path: str | os.PathLike) -> dict[int, str]:
    """A CSV with a header ``sample_index,subject_id``: one sample per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subjects file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"sample_index", "subject_id"} <= set(reader.fieldnames):
            raise ValueError(f"subjects file {path} needs the header sample_index,subject_id, got {reader.fieldnames}")
        try:
            return {int(row["sample_index"]): row["subject_id"] for row in reader}
        except (TypeError, ValueError):
            raise ValueError(f"subjects file {path}: sample_index must be an integer on line {reader.line_num}") from None


def subject_list(subjects: SubjectsArg, num_samples: int) -> list[str | None] | None:
    """Subjects given as a CSV path, a {sample index: subject} mapping or a per-sample list, as a per-sample list."""
    if subjects is None:
        return None
    if isinstance(subjects, (str, os.PathLike)):
        subjects = read_subjects(subjects)
    if isinstance(subjects, Mapping):
        bad = [i for i in subjects if not 0 <= int(i) < num_samples]
        if bad:
            raise ValueError(f"subject mapping names sample index(es) {sorted(bad)[:10]} out of range 0..{num_samples - 1}")
        out: list[str | None] = [None] * num_samples
        for i, subject in subjects.items():
            out[int(i)] = None if subject in (None, "") else str(subject)
        return out
    if len(subjects) != num_samples:
        raise ValueError(f"subjects has {len(subjects)} entries for {num_samples} samples")
    return [None if v in (None, "") else str(v) for v in subjects]
