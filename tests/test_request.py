"""ForgetRequest and UnlearningDataModule: splits and bad input."""
import pytest
import torch
from torch.utils.data import TensorDataset

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
