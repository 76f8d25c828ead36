"""Evaluation batches without the per-sample cost of a DataLoader, where the loader allows it.

An unlearning run reads the same small held-out and retain sets many times (the stopping rule's checks, the
accuracy splits, the head calibration's features). A DataLoader over a ``TensorDataset`` fetches every sample
on its own and stacks them again; on small data that bookkeeping costs more than the model's forward pass.
:func:`eval_batches` yields the very batches such a loader would (same samples, same order, same batch
boundaries, same dtypes) by indexing the tensors once per batch, and falls back to the loader itself for
anything else (shuffled or weighted sampling, workers, a custom collate, other datasets).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate


def _tensor_source(dataset) -> tuple[TensorDataset, torch.Tensor | None] | None:
    """The TensorDataset under a chain of Subsets and the composed indices (None: all rows), or None."""
    indices = None
    while type(dataset) is Subset:  # a subclass may fetch differently
        own = torch.as_tensor(np.asarray(dataset.indices, dtype=np.int64))
        indices = own if indices is None else own[indices]
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset:  # a subclass may transform its items
        return None
    return dataset, indices


def _plain(loader: DataLoader) -> bool:
    """An unshuffled, single-process loader with the default collate and batch sampler."""
    return (isinstance(loader, DataLoader) and loader.num_workers == 0 and loader.collate_fn is default_collate
            and not loader.pin_memory and isinstance(loader.sampler, SequentialSampler)
            and type(loader.batch_sampler) is BatchSampler and loader.batch_size is not None)


def eval_batches(loader: Iterable) -> Iterator:
    """The batches of ``loader``: indexed straight from the tensors for a plain loader over a TensorDataset (or
    Subsets of one), bit for bit what the loader yields; every other iterable is iterated as it is."""
    source = _tensor_source(loader.dataset) if isinstance(loader, DataLoader) and _plain(loader) else None
    if source is None:
        yield from loader
        return
    dataset, indices = source
    n = len(dataset) if indices is None else len(indices)
    size, drop_last = int(loader.batch_size), bool(loader.drop_last)
    for start in range(0, n, size):
        stop = min(start + size, n)
        if drop_last and stop - start < size:
            return
        rows = slice(start, stop) if indices is None else indices[start:stop]
        # default_collate turns a tuple item into a list of stacked (new, contiguous) fields
        yield [t[rows].clone(memory_format=torch.contiguous_format) for t in dataset.tensors]
