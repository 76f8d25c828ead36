"""One pass over a dataset before any work: item shape, finite inputs, labels in range.

One NaN pixel turns every weight and BatchNorm statistic non-finite within a step, and the repair
still ends "on budget"; a label outside ``0..num_classes-1`` fails later, deep inside torch. Both are
refused when a data module is built, in one line naming the dataset, the first bad sample and what
was found. Datasets that expose tensors (``TensorDataset``, ``Subset`` / ``ConcatDataset`` of them,
``data`` + ``targets`` arrays like torchvision's) are checked vectorised; any other dataset is read
once, in batches.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset
from torch.utils.data.dataloader import default_collate

log = logging.getLogger(__name__)

#: The item layout every loader of the library reads: ``batch[0]`` inputs, ``batch[1]`` labels, the rest passed along.
ITEM_SHAPE = "a tuple (input, label) or (input, label, *extra)"
#: Items read per step when a dataset exposes no tensors.
SCAN_BATCH = 512

# (labels, per-sample "input is finite" flags or None when every input is finite)
_Scan = tuple[Tensor, "Tensor | None"]


def checked_targets(dataset: Dataset, name: str, num_classes: int | None = None) -> Tensor:
    """The integer labels of ``dataset``, after checking all of it once.

    Raises a one-line ``ValueError`` starting with ``name`` when an item is not ``(input, label, *extra)``,
    a label is not an integer class id in ``0..num_classes-1`` (``>= 0`` when ``num_classes`` is None) or
    an input holds NaN or an infinity.
    """
    start = time.perf_counter()
    n = len(dataset)  # type: ignore[arg-type]
    if n:
        _check_item(dataset[0], 0, name)
    scan = _tensor_scan(dataset, name)
    labels, finite = scan if scan is not None else _batch_scan(dataset, n, name)
    _check_range(labels, name, num_classes)
    if finite is not None and not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ValueError(f"{name}: the input of sample {i} is not finite ({_first_non_finite(dataset[i][0])}); "
                         "inputs must be finite numbers")
    log.debug("checked %d samples of the %s in %.3f s (%s)", n, name, time.perf_counter() - start,
              "vectorised" if scan is not None else "read in batches")
    return labels


# -- datasets that expose tensors -------------------------------------------------------------------
def _tensor_scan(dataset: Dataset, name: str) -> _Scan | None:
    """Labels and finite flags without reading items, or None when the dataset does not expose tensors."""
    if isinstance(dataset, TensorDataset):
        return _labels(dataset.tensors[1], name), _finite_rows(dataset.tensors[0])
    if isinstance(dataset, Subset):
        base = _tensor_scan(dataset.dataset, name)
        if base is None:
            return None
        index = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        return base[0][index], None if base[1] is None else base[1][index]
    if isinstance(dataset, ConcatDataset):
        parts = [_tensor_scan(d, name) for d in dataset.datasets]
        if any(p is None for p in parts):
            return None
        labels = torch.cat([p[0] for p in parts])
        if all(p[1] is None for p in parts):
            return labels, None
        return labels, torch.cat([torch.ones(len(p[0]), dtype=torch.bool) if p[1] is None else p[1] for p in parts])
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if targets is not None and isinstance(data, (Tensor, np.ndarray)) and len(data) == len(targets):
        if isinstance(data, np.ndarray) and data.dtype.kind not in "biuf":
            return None
        return _labels(torch.as_tensor(targets), name), _finite_rows(torch.as_tensor(data))
    return None


def _finite_rows(inputs: Tensor) -> Tensor | None:
    """None when every value is finite, else a flag per sample.

    A sum is the cheap test (NaN and inf propagate through it; on MNIST a sum takes ~6 ms where
    ``isfinite`` over every value takes ~250 ms); only rows whose sum is not finite (a NaN, an inf,
    or finite values that overflow the sum) are looked at value by value.
    """
    if not inputs.is_floating_point() or len(inputs) == 0:
        return None
    wide = torch.float32 if inputs.element_size() < 4 else inputs.dtype  # half precision overflows at 65504
    if torch.isfinite(inputs.sum(dtype=wide)):
        return None
    rows = inputs.reshape(len(inputs), -1)
    finite = torch.isfinite(rows.sum(dim=1, dtype=wide))
    suspects = (~finite).nonzero().flatten()
    finite[suspects] = torch.isfinite(rows[suspects]).all(dim=1)
    return finite


# -- any other map-style dataset: read once, in batches -----------------------------------------------
def _batch_scan(dataset: Dataset, n: int, name: str) -> _Scan:
    labels, finite = [], []
    for start in range(0, n, SCAN_BATCH):
        items = [dataset[i] for i in range(start, min(start + SCAN_BATCH, n))]
        for offset, item in enumerate(items):
            _check_item(item, start + offset, name)
        try:
            x, y = (default_collate([item[k] for item in items]) for k in (0, 1))
        except (TypeError, RuntimeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{name}: samples {start}..{start + len(items) - 1} cannot be batched: {reason}") from None
        y = torch.as_tensor(y)
        labels.append(_labels(y.reshape(-1) if y.numel() == len(items) else y, name))
        x = torch.as_tensor(x) if isinstance(x, np.ndarray) else x
        flags = _finite_rows(x) if isinstance(x, Tensor) else None
        finite.append(torch.ones(len(items), dtype=torch.bool) if flags is None else flags)
    if not labels:
        return torch.zeros(0, dtype=torch.long), None
    return torch.cat(labels), torch.cat(finite)


# -- the checks ---------------------------------------------------------------------------------------
def _check_item(item: Any, index: int, name: str) -> None:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return
    if isinstance(item, (tuple, list)):
        shape = f"a {type(item).__name__} of {len(item)} element{'s' * (len(item) != 1)} (no labels)"
    else:
        kind = type(item).__name__
        shape = f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"
    raise ValueError(f"{name}: item {index} is {shape}; expected {ITEM_SHAPE}")


def _labels(labels: Tensor, name: str) -> Tensor:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"{name}: labels must be integer class ids, one per sample; got dtype {labels.dtype} "
                         f"shape {tuple(labels.shape)}")
    return labels.long()


def _check_range(labels: Tensor, name: str, num_classes: int | None) -> None:
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        allowed = ("labels are class ids >= 0" if num_classes is None
                   else f"allowed labels are 0..{num_classes - 1} (num_classes={num_classes})")
        raise ValueError(f"{name}: sample {i} has label {int(labels[i])}; {allowed}")


def _first_non_finite(x: Any) -> str:
    """``nan at [0, 2, 5]``: the first non-finite value of one input and where it sits."""
    x = torch.as_tensor(x)
    flat = x.reshape(-1)
    first = int((~torch.isfinite(flat)).nonzero()[0])
    where = [int(i) for i in np.unravel_index(first, tuple(x.shape))] if x.dim() else []
    return f"{float(flat[first])} at {where}"
