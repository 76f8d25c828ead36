"""load_mnist on small fake idx files (a valid set loads; each corruption names the file and what is wrong), and
the check every data module makes of its datasets (item shape, finite inputs, labels in range)."""
from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_unlearn.data import load_mnist
from lightning_unlearn.data.datasets import MNIST_MEAN, MNIST_STD
from lightning_unlearn.data.validation import checked_targets

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def idx_bytes(array: np.ndarray, type_code: int = 0x08, ndim: int | None = None) -> bytes:
    """The idx encoding: magic 00 00 <type> <ndim>, big-endian uint32 dims, then the raw values."""
    ndim = array.ndim if ndim is None else ndim
    header = bytes([0, 0, type_code, ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape[:ndim])
    return header + array.tobytes()


def write_set(root: Path, n_train: int = 6, n_test: int = 4, size: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny MNIST-shaped set (``size`` x ``size`` images) as the four gzipped idx files under ``root``."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (root / name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def one_line_error(root: Path, match: str) -> str:
    with pytest.raises(ValueError) as info:
        load_mnist(root)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(match, message), message
    return message


def test_a_valid_tiny_set_loads_exactly(tmp_path):
    arrays = write_set(tmp_path)
    train, test = load_mnist(tmp_path)
    assert train.tensors[0].shape == (6, 1, 5, 5) and test.tensors[0].shape == (4, 1, 5, 5)
    pixels = torch.from_numpy(arrays[TRAIN_IMAGES].astype(np.float32) / 255.0).unsqueeze(1)
    assert torch.allclose(train.tensors[0], (pixels - MNIST_MEAN) / MNIST_STD)
    assert torch.equal(train.tensors[1], torch.from_numpy(arrays[TRAIN_LABELS].astype(np.int64)))
    assert torch.equal(test.tensors[1], torch.from_numpy(arrays[TEST_LABELS].astype(np.int64)))
    raw, _ = load_mnist(tmp_path, normalize=False)
    assert torch.equal(raw.tensors[0], pixels)
    nested = tmp_path / "torchvision"  # torchvision's layout: root/MNIST/raw
    write_set(nested / "MNIST" / "raw")
    assert torch.equal(load_mnist(nested)[0].tensors[1], train.tensors[1])


def test_the_real_mnist_files_load_when_present():
    root = Path("/work/shared/data/mnist")
    if not (root / TRAIN_IMAGES).exists():
        pytest.skip(f"no MNIST copy at {root} (this machine's shared data); the fake-file tests cover the reader")
    train, test = load_mnist(root)
    assert train.tensors[0].shape == (60000, 1, 28, 28) and test.tensors[0].shape == (10000, 1, 28, 28)
    assert set(train.tensors[1].unique().tolist()) == set(range(10))


def test_truncated_gzip_names_the_file(tmp_path):
    write_set(tmp_path)
    path = tmp_path / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:-20])  # a download cut short: the gzip stream has no end
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} is truncated: the gzip stream ends")


def test_a_file_that_is_not_gzip_names_the_file(tmp_path):
    write_set(tmp_path)
    path = tmp_path / TEST_IMAGES
    path.write_bytes(b"<html>404 Not Found</html>")
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} is not a gzip file")
    path.write_bytes(idx_bytes(np.zeros((4, 5, 5), np.uint8)))  # a valid idx file, just not compressed
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} is not a gzip file")


def test_corrupt_gzip_names_the_file(tmp_path):
    write_set(tmp_path)
    path = tmp_path / TRAIN_LABELS
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the CRC of the uncompressed data
    path.write_bytes(bytes(data))
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} is a corrupt gzip file: .*CRC")


def test_idx_payload_shorter_or_longer_than_its_header(tmp_path):
    write_set(tmp_path)
    path = tmp_path / TRAIN_IMAGES
    images = np.zeros((6, 5, 5), np.uint8)
    path.write_bytes(gzip.compress(idx_bytes(images)[:-7]))
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} is truncated: header says 6x5x5 \(150 bytes\), "
                             r"found 143 bytes$")
    path.write_bytes(gzip.compress(idx_bytes(images) + b"\0\0\0"))
    one_line_error(tmp_path, r"has 3 bytes past its data: header says 6x5x5 \(150 bytes\), found 153 bytes$")
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0])))  # cut inside the dimensions
    one_line_error(tmp_path, r"is truncated: 6 bytes, shorter than its 16-byte header$")


def test_label_count_must_match_the_image_count(tmp_path):
    write_set(tmp_path)
    path = tmp_path / TEST_LABELS
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(path))} has 3 labels for 4 images \(in {TEST_IMAGES}\)$")


def test_magic_number_type_code_and_dimensions_are_checked(tmp_path):
    write_set(tmp_path)
    images, labels = tmp_path / TRAIN_IMAGES, tmp_path / TRAIN_LABELS
    images.write_bytes(gzip.compress(b"\x1f\x8b\x08\x03" + bytes(200)))  # right length, wrong magic
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(images))} is not an idx file: magic number 1f8b0803, "
                             r"expected 00000803$")
    floats = np.zeros((6, 5, 5), ">f4")
    images.write_bytes(gzip.compress(idx_bytes(floats, type_code=0x0D)))
    one_line_error(tmp_path, r"has idx type code 0x0d; MNIST stores unsigned bytes \(0x08\)$")
    write_set(tmp_path)
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros((6, 5, 5), np.uint8))))  # images where labels belong
    one_line_error(tmp_path, rf"^MNIST file {re.escape(str(labels))} has 3 dimensions, expected 1 \(labels N\)$")
    labels.write_bytes(b"")  # empty file
    one_line_error(tmp_path, r"is not a gzip file")


def test_a_missing_file_of_a_found_set_is_named(tmp_path):
    write_set(tmp_path)
    (tmp_path / TEST_LABELS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"^MNIST file {re.escape(str(tmp_path / TEST_LABELS))} is missing$"):
        load_mnist(tmp_path)


# -- checked_targets: the one pass a data module makes over its data before any work (issue 21) ----------------------
class ItemsOnly(Dataset):
    """No tensors exposed: the check reads every item, in batches; counts the reads."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.reads = base, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        x, y = self.base[i]
        return x, int(y), i


class Arrays(ItemsOnly):
    """torchvision's layout: ``data`` (uint8 or float array) and ``targets`` (a list), items built on access."""

    def __init__(self, data: np.ndarray, targets: list[int]) -> None:
        super().__init__(list(zip(data, targets)))
        self.data, self.targets = data, targets


def _message(dataset, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        checked_targets(dataset, "training dataset", **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_tensor_and_item_by_item_checks_agree(tmp_path):
    write_set(tmp_path, n_train=1200)  # more than one read batch (SCAN_BATCH)
    train, _ = load_mnist(tmp_path)
    labels = train.tensors[1]
    items = ItemsOnly(train)
    for dataset in (train, items, Subset(train, range(1200)), ConcatDataset([Subset(items, range(7)), items])):
        expected = labels if len(dataset) == 1200 else torch.cat([labels[:7], labels])
        assert torch.equal(checked_targets(dataset, "training dataset", num_classes=10), expected)
    assert items.reads >= 2 * 1200  # read in full, once per check
    x = train.tensors[0].clone()
    x[1100, 0, 1, 3], x[1150, 0, 0, 0] = float("inf"), float("nan")
    poisoned = TensorDataset(x, labels)
    expected = ("training dataset: the input of sample 1100 is not finite (inf at [0, 1, 3]); "
                "inputs must be finite numbers")
    assert _message(poisoned) == _message(ItemsOnly(poisoned)) == expected
    assert _message(Subset(poisoned, [0, 1150, 1100])).startswith(  # the index into the dataset as given
        "training dataset: the input of sample 1 is not finite (nan at [0, 0, 0])")


def test_arrays_are_checked_without_reading_every_item():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 5, 5), dtype=np.uint8)
    dataset = Arrays(images, rng.integers(0, 10, 300).tolist())
    assert checked_targets(dataset, "training dataset", num_classes=10).tolist() == dataset.targets
    assert dataset.reads == 1  # only item 0, for its shape: uint8 pixels are finite by construction
    floats = images.astype(np.float64)
    floats[:, 0, 0] = 1e308  # finite, but its sum overflows: the per-sample check must not call it infinite
    assert len(checked_targets(Arrays(floats, dataset.targets), "training dataset")) == 300
    floats[42, 4, 1] = -np.inf
    assert "sample 42 is not finite (-inf at [4, 1])" in _message(Arrays(floats, dataset.targets))
    labels = list(dataset.targets)
    labels[7] = 10
    assert _message(Arrays(images, labels), num_classes=10) == (
        "training dataset: sample 7 has label 10; allowed labels are 0..9 (num_classes=10)")
    assert _message(TensorDataset(torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]))).startswith(
        "training dataset: labels must be integer class ids")
