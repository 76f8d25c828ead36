"""Evaluation batches straight from the tensors: the same batches as the DataLoader, and the same unlearning."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_unlearn import ForgetRequest, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.data import batches as batches_module
from lightning_unlearn.data.batches import eval_batches


def _data(n: int = 50) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        type(x) is type(y) and len(x) == len(y) and all(torch.equal(s, t) and s.dtype == t.dtype for s, t in zip(x, y))
        for x, y in zip(a, b))


@pytest.mark.parametrize("dataset", ["tensors", "subset", "nested-subset"])
@pytest.mark.parametrize("batch_size, drop_last", [(16, False), (16, True), (64, False), (1, False)])
def test_batches_are_the_loaders_bit_for_bit(dataset, batch_size, drop_last):
    data = _data()
    if dataset != "tensors":
        data = Subset(data, [7, 3, 3, 40, 12, 0, 49, 25, 8, 9, 10, 33, 2, 5, 6, 1, 4, 30, 31, 32])
    if dataset == "nested-subset":
        data = Subset(data, [5, 0, 19, 2, 2, 11, 3, 4, 6, 7, 8])
    loader = DataLoader(data, batch_size=batch_size, drop_last=drop_last)
    ours = list(eval_batches(loader))
    assert _same(ours, list(loader)) and len(ours) == len(loader)
    assert all(isinstance(b, list) for b in ours)  # default_collate turns tuple items into lists


def test_a_fresh_contiguous_tensor_per_batch_not_a_view_of_the_data():
    data = _data(8)
    first = next(eval_batches(DataLoader(data, batch_size=4)))
    first[0].zero_()
    assert not torch.equal(data.tensors[0][:4], torch.zeros(4, 1, 8, 8))
    strided = TensorDataset(torch.randn(8, 8, 1, 8).transpose(1, 2), torch.arange(8))  # a non-contiguous source
    for batch in (eval_batches(DataLoader(strided, batch_size=3)),
                  eval_batches(DataLoader(Subset(strided, [5, 1, 2, 7]), batch_size=3))):
        assert all(b[0].is_contiguous() for b in batch)


class _Shifted(TensorDataset):
    """A TensorDataset whose items are transformed: its own __getitem__ must be used."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 1, y


class _Reversed(Subset):
    def __getitem__(self, i):
        return self.dataset[self.indices[len(self.indices) - 1 - i]]

    __getitems__ = None


class _Listed(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


@pytest.mark.parametrize("make", [
    lambda d: DataLoader(d, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
    lambda d: DataLoader(_Listed(d), batch_size=8),
    lambda d: DataLoader(d, batch_size=8, collate_fn=lambda items: [torch.stack([i[0] for i in items]) + 1,
                                                                   torch.stack([i[1] for i in items])]),
    lambda d: [[d.tensors[0][:2], d.tensors[1][:2]]],
    lambda d: DataLoader(_Shifted(*d.tensors), batch_size=8),
    lambda d: DataLoader(_Reversed(d, list(range(12))), batch_size=8),
], ids=["shuffled", "other-dataset", "own-collate", "plain-iterable", "tensor-dataset-subclass", "subset-subclass"])
def test_anything_else_is_iterated_as_it_is(make):
    """Shuffling, other datasets, a custom collate or a plain iterable: the loader's own batches (two identically
    built loaders yield the same batches, the shuffled one drawing from its own seeded generator)."""
    assert _same(list(eval_batches(make(_data(20)))), list(make(_data(20))))


def test_unlearning_is_bit_identical_with_and_without_the_tensor_batches(trained_model, digits, one_thread, monkeypatch):
    """The whole default procedure (class request: checks, head calibration, accuracies; sample request: held-out
    targets) gives the same parameters, checks and accuracies when every evaluation goes through the DataLoader."""
    for request in (ForgetRequest(classes=[3]), ForgetRequest(sample_ids=list(range(0, 400, 8)))):
        dm = UnlearningDataModule(digits[0], digits[1], request, batch_size=64)
        fast = unlearn(trained_model, dm)
        with monkeypatch.context() as patched:
            patched.setattr(batches_module, "_tensor_source", lambda dataset: None)
            slow = unlearn(trained_model, dm)
        for (name, a), b in zip(fast.model.state_dict().items(), slow.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert fast.extra["stopping"] == slow.extra["stopping"] and fast.metrics == slow.metrics
        assert fast.extra["steps"] == slow.extra["steps"]


@pytest.mark.parametrize("tied", [False, True], ids=["random", "all-tied-logits"])
def test_one_metric_update_counts_what_one_per_batch_counts(tied):
    """The accuracy helpers update their metric once with every prediction: the counts equal per-batch updates
    with the logits (ties broken the same way)."""
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_unlearn.metrics import ClassAccuracy, accuracy, class_accuracies

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    if tied:
        with torch.no_grad():
            model[1].weight.zero_()
            model[1].bias.zero_()
    loader = DataLoader(_data(50), batch_size=16)
    per_batch, micro = ClassAccuracy(10, [3]), MulticlassAccuracy(num_classes=10, average="micro")
    with torch.no_grad():
        for x, y in loader:
            per_batch.update(model(x), y)
            micro.update(model(x), y)
    assert class_accuracies(model, loader, 10, [3]) == per_batch.compute()
    assert accuracy(model, loader, 10) == float(micro.compute())
