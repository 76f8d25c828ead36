"""ForgetRequest and UnlearningDataModule: splits and bad input."""
import re

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn.data.datasets import dataset_targets


def test_class_request_splits_train_and_test(class3_dm, digits):
    train_y = dataset_targets(digits[0])
    assert set(train_y[class3_dm.forget_indices].tolist()) == {3}
    assert 3 not in set(train_y[class3_dm.retain_indices].tolist())
    assert len(class3_dm.forget_indices) + len(class3_dm.retain_indices) == len(train_y)
    forget_test, remaining_test = class3_dm.test_dataloader()
    assert {int(y) for _, ys in forget_test for y in ys} == {3}
    assert 3 not in {int(y) for _, ys in remaining_test for y in ys}


def test_sample_request_and_combined_loader(digits):
    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(sample_ids=[0, 5, 7]), batch_size=16)
    assert dm.forget_indices.tolist() == [0, 5, 7]
    assert dm.request.kind == "sample"
    assert isinstance(next(iter(dm.train_dataloader())), list)  # no fit asks for forget batches: retain only
    batch = next(iter(dm.combined_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    assert set(batch) == {"retain", "forget"}
    assert batch["forget"][0].shape[0] == 3 and batch["retain"][0].shape[0] == 16


def test_request_needs_exactly_one_field():
    with pytest.raises(ValueError, match="exactly one"):
        ForgetRequest()
    with pytest.raises(ValueError, match="exactly one"):
        ForgetRequest(classes=[1], sample_ids=[2])
    with pytest.raises(TypeError, match="integers"):
        ForgetRequest(classes=[1.5])


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        ({"classes": [12]}, r"unknown class\(es\) \[12\]; allowed classes are \[0, 1, 2"),
        ({"sample_ids": [5, 100000]}, r"sample id\(s\) \[100000\] out of range; allowed ids are 0\.\.1346"),
    ],
)
def test_bad_requests_fail_before_work(digits, request_kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnlearningDataModule(digits[0], digits[1], ForgetRequest(**request_kwargs))


def test_empty_forget_set_is_an_error(digits):
    x, y = digits[0].tensors
    keep = y != 3
    without_3 = TensorDataset(x[keep], y[keep])
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training samples"):
        UnlearningDataModule(without_3, digits[1], ForgetRequest(classes=[3]), num_classes=10)


def test_dataset_without_labels_is_an_error(digits):
    unlabelled = TensorDataset(digits[0].tensors[0])
    with pytest.raises(ValueError, match="no labels"):
        UnlearningDataModule(unlabelled, digits[1], ForgetRequest(classes=[3]))
    float_labels = TensorDataset(digits[0].tensors[0], digits[0].tensors[1].float())
    with pytest.raises(ValueError, match="integer tensor"):
        dataset_targets(float_labels)


def test_forgetting_everything_is_an_error():
    ds = TensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="no class to retain"):
        UnlearningDataModule(ds, ds, ForgetRequest(classes=[0, 1]))


def test_wraps_an_existing_lightning_datamodule(digits):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class UserData(pl.LightningDataModule):
        batch_size = 32

        def train_dataloader(self):
            return DataLoader(digits[0], batch_size=32)

        def test_dataloader(self):
            return DataLoader(digits[1], batch_size=32)

    dm = UnlearningDataModule.from_datamodule(UserData(), ForgetRequest(classes=[3]))
    assert dm.batch_size == 32 and len(dm.forget_indices) > 0


# -- data checked once at setup (issue 21, items 6 and 12) ---------------------------------------------------------
class ItemsOnly(Dataset):
    """A dataset that exposes no tensors: the check has to read its items (in batches)."""

    def __init__(self, base: Dataset, extra: bool = False) -> None:
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return (x, int(y), i) if self.extra else (x, int(y))


def _poisoned(dataset: TensorDataset, at: int, value: float, label: int | None = None) -> TensorDataset:
    x, y = (t.clone() for t in dataset.tensors)
    x[at, 0, 2, 5] = value
    if label is not None:
        y[at] = label
    return TensorDataset(x, y)


WRAPS = {
    "tensors": lambda ds: ds,
    "subset": lambda ds: Subset(ds, list(range(len(ds)))),
    "items": ItemsOnly,
    "items_with_index": lambda ds: ItemsOnly(ds, extra=True),
    "concat": lambda ds: ConcatDataset([Subset(ds, range(10)), Subset(ds, range(10, len(ds)))]),
}


@pytest.mark.parametrize("wrap", WRAPS)
def test_non_finite_inputs_are_refused_naming_the_dataset_index_and_value(digits, wrap):
    train = WRAPS[wrap](_poisoned(_poisoned(digits[0], 17, float("nan")), 40, float("inf")))
    with pytest.raises(ValueError) as info:
        UnlearningDataModule(train, digits[1], ForgetRequest(classes=[3]))
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"training dataset: the input of sample 17 is not finite \(nan at \[0, 2, 5\]\); "
                        r"inputs must be finite numbers", message), message
    test = WRAPS[wrap](_poisoned(digits[1], 3, float("-inf")))
    with pytest.raises(ValueError, match=r"^test dataset: the input of sample 3 is not finite \(-inf at \[0, 2, 5\]\)"):
        UnlearningDataModule(digits[0], test, ForgetRequest(classes=[3]))


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("label, num_classes, allowed", [
    (12, 10, "allowed labels are 0..9 (num_classes=10)"),
    (-1, 10, "allowed labels are 0..9 (num_classes=10)"),
    (-1, None, "labels are class ids >= 0"),
])
def test_labels_out_of_range_are_refused(digits, wrap, label, num_classes, allowed):
    train = WRAPS[wrap](_poisoned(digits[0], 5, 0.0, label=label))
    with pytest.raises(ValueError) as info:
        UnlearningDataModule(train, digits[1], ForgetRequest(classes=[3]), num_classes=num_classes)
    assert str(info.value) == f"training dataset: sample 5 has label {label}; {allowed}"


@pytest.mark.parametrize("item, shape", [
    ({"x": torch.zeros(1, 8, 8), "y": 1}, "a dict"),
    (torch.zeros(1, 8, 8), "a Tensor"),
    ((torch.zeros(1, 8, 8),), "a tuple of 1 element (no labels)"),
])
def test_items_that_are_not_input_label_tuples_are_refused(digits, item, shape):
    class Odd(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return item

    with pytest.raises(ValueError) as info:
        UnlearningDataModule(Odd(), digits[1], ForgetRequest(classes=[3]))
    assert str(info.value) == (f"training dataset: item 0 is {shape}; expected a tuple (input, label) "
                               "or (input, label, *extra)")


def test_items_with_extra_fields_are_split_like_pairs(digits):
    dm = UnlearningDataModule(ItemsOnly(digits[0], extra=True), ItemsOnly(digits[1], extra=True),
                              ForgetRequest(classes=[3]), batch_size=16, num_classes=10)
    plain = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=16, num_classes=10)
    assert dm.forget_indices.tolist() == plain.forget_indices.tolist()
    x, y, idx = next(iter(dm.forget_dataloader()))
    assert set(y.tolist()) == {3} and idx.tolist() == dm.forget_indices[:16].tolist()
