"""What to forget: a class, a client or chosen samples, validated against the data."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ForgetRequest:
    """A deletion request.

    Exactly one of ``classes``, ``sample_ids`` (indices into the training dataset),
    ``clients`` (federated client ids) or ``subjects`` (data-subject ids recorded in a
    request ledger, resolved to sample ids there) is set. The request is plain data; it is
    checked against a dataset with :meth:`validate` before any work starts.
    """

    classes: tuple[int, ...] = field(default=())
    sample_ids: tuple[int, ...] = field(default=())
    clients: tuple[int, ...] = field(default=())
    subjects: tuple[str, ...] = field(default=())

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        sample_ids: Sequence[int] | None = None,
        clients: Sequence[int] | None = None,
        subjects: Sequence[str] | None = None,
    ) -> None:
        parts = {
            "classes": _as_int_tuple(classes, "classes"),
            "sample_ids": _as_int_tuple(sample_ids, "sample_ids"),
            "clients": _as_int_tuple(clients, "clients"),
            "subjects": _as_str_tuple(subjects, "subjects"),
        }
        given = [k for k, v in parts.items() if v]
        if len(given) != 1:
            raise ValueError(
                "ForgetRequest needs exactly one non-empty field of classes, sample_ids, clients or subjects; "
                f"got {given or 'none'}"
            )
        for key, value in parts.items():
            object.__setattr__(self, key, value)

    @property
    def kind(self) -> str:
        """``"class"``, ``"sample"``, ``"client"`` or ``"subject"``."""
        if self.classes:
            return "class"
        if self.sample_ids:
            return "sample"
        return "client" if self.clients else "subject"

    def validate(self, targets: torch.Tensor, num_classes: int | None = None) -> None:
        """Fail fast if the request does not fit the labelled data ``targets``."""
        targets = torch.as_tensor(targets)
        if targets.numel() == 0:
            raise ValueError("the training dataset is empty: there is nothing to forget from")
        if self.classes:
            present = sorted(int(c) for c in torch.unique(targets))
            allowed = list(range(num_classes)) if num_classes is not None else present
            unknown = [c for c in self.classes if c not in allowed]
            if unknown:
                raise ValueError(f"unknown class(es) {unknown}; allowed classes are {allowed}")
            absent = [c for c in self.classes if c not in present]
            if absent:
                raise ValueError(f"class(es) {absent} have no training samples: the forget set is empty")
            if len(set(self.classes)) >= len(present):
                raise ValueError(f"forgetting classes {list(self.classes)} would leave no class to retain")
        if self.sample_ids:
            n = int(targets.numel())
            bad = [i for i in self.sample_ids if not 0 <= i < n]
            if bad:
                raise ValueError(f"sample id(s) {bad[:10]} out of range; allowed ids are 0..{n - 1}")
            if len(set(self.sample_ids)) >= n:
                raise ValueError("the forget set covers the whole training set: nothing would be retained")

    def resolve(
        self,
        targets: torch.Tensor | np.ndarray,
        sample_ids: np.ndarray | None = None,
        clients: np.ndarray | None = None,
    ) -> np.ndarray:
        """Which of these samples the request names: the one resolver for every request kind and engine.

        Args:
            targets: each sample's label (class requests).
            sample_ids: each sample's global id (sample requests; default: its position).
            clients: each sample's client id (client requests: a federated partition or one node's shard).
        """
        targets = np.asarray(torch.as_tensor(targets).cpu())
        if self.classes:
            return np.isin(targets, np.asarray(self.classes))
        if self.sample_ids:
            ids = np.arange(len(targets)) if sample_ids is None else np.asarray(sample_ids)
            return np.isin(ids, np.asarray(self.sample_ids, dtype=np.int64))
        if self.clients:
            if clients is None:
                raise ValueError("a client request is resolved by FederatedDataModule, not by a central data module")
            return np.isin(np.asarray(clients), np.asarray(self.clients))
        raise ValueError("a subject request is resolved through a request ledger (lightning_unlearn.ledger) "
                         "into sample ids first")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, used in reports."""
        return {"kind": self.kind, **{k: list(v) for k, v in asdict(self).items() if v}}


def random_samples_request(
    num_train: int, fraction: float | None = None, count: int | None = None, seed: int = 0
) -> ForgetRequest:
    """A seeded request to forget ``count`` (or ``fraction`` of ``num_train``) training samples chosen at random."""
    if (fraction is None) == (count is None):
        raise ValueError(f"give exactly one of fraction or count; got fraction={fraction!r}, count={count!r}")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        count = max(1, int(round(fraction * num_train)))
    if count < 1 or count >= num_train:
        raise ValueError(f"the forget set has {count} samples but the training set only {num_train}; "
                         f"allowed forget sizes are 1..{num_train - 1}")
    picked = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))[:count]
    return ForgetRequest(sample_ids=picked.tolist())


def _as_str_tuple(values: Sequence[str] | None, name: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise TypeError(f"{name} must be non-empty strings, got {v!r}")
        out.append(v)
    return tuple(sorted(set(out)))


def _as_int_tuple(values: Sequence[int] | None, name: str) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, np.integer)):
        values = [values]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
            isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point()
        ):
            raise TypeError(f"{name} must be integers, got {v!r}")
        out.append(int(v))
    unique = tuple(sorted(set(out)))
    if len(unique) < len(out):
        repeated = sorted({v for v in out if out.count(v) > 1})
        warnings.warn(f"{name} {repeated[:10]} given more than once; each is forgotten once", UserWarning, stacklevel=3)
    return unique
