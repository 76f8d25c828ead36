"""Dataset readers and label access: the embedded digits default and MNIST from a path."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """Integer labels of a map-style dataset, without loading its inputs where possible.

    Understands ``TensorDataset``, ``Subset``, ``ConcatDataset`` and any dataset with a
    ``targets`` attribute (torchvision style); otherwise reads ``dataset[i][1]``.
    """
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise ValueError("the dataset has no labels: a TensorDataset needs (inputs, labels) tensors")
        return _check_labels(dataset.tensors[1])
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return _check_labels(torch.as_tensor(targets))
    try:
        labels = []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError
            labels.append(int(item[1]))
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"the dataset {type(dataset).__name__} has no labels: items must be (input, label) pairs "
            "or the dataset must expose a `targets` attribute"
        ) from err
    return torch.tensor(labels, dtype=torch.long)


def _check_labels(labels: torch.Tensor) -> torch.Tensor:
    if labels.is_floating_point() or labels.dim() != 1:
        raise ValueError(
            f"labels must be a 1-D integer tensor of class ids, got dtype {labels.dtype} shape {tuple(labels.shape)}"
        )
    return labels.long()


def load_digits_datasets(test_size: float = 0.25, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default data.

    Returns stratified (train, test) ``TensorDataset`` of ``(N, 1, 8, 8)`` float images scaled to [0, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    as_ds = lambda a, b: TensorDataset(torch.from_numpy(a).unsqueeze(1), torch.from_numpy(b))  # noqa: E731
    return as_ds(x_tr, y_tr), as_ds(x_te, y_te)


def load_mnist(root: str | Path, normalize: bool = True) -> tuple[TensorDataset, TensorDataset]:
    """MNIST from the original idx ``.gz`` files under ``root`` (or ``root/MNIST/raw``).

    No download ever happens: point ``root`` at a local copy.
    """
    if root is None or str(root) == "":
        raise ValueError("MNIST needs a data root: pass root=/path/to/mnist (the folder holding the idx .gz files)")
    root = Path(root).expanduser()
    folder = next((p for p in (root, root / "MNIST" / "raw") if (p / _MNIST_FILES["train"][0]).exists()), None)
    if folder is None:
        raise FileNotFoundError(
            f"no MNIST idx files under {root} (looked for {_MNIST_FILES['train'][0]} there and in MNIST/raw)"
        )
    out = []
    for split in ("train", "test"):
        image_path, label_path = (folder / name for name in _MNIST_FILES[split])
        images = _read_idx(image_path, ndim=3).astype(np.float32) / 255.0
        labels = _read_idx(label_path, ndim=1).astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"MNIST file {label_path} has {len(labels)} labels for {len(images)} images "
                             f"(in {image_path.name})")
        x = torch.from_numpy(images).unsqueeze(1)
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        out.append(TensorDataset(x, torch.from_numpy(labels)))
    return out[0], out[1]


_IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only one MNIST uses
_GZIP_MAGIC = b"\x1f\x8b"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One gzipped idx file (magic ``00 00 08 ndim``, big-endian dims, then the bytes), checked against its header.

    Every way the file can be wrong ends in a one-line ValueError naming the file: a download cut
    short or a wrong file otherwise surfaces as an opaque numpy reshape error (or, worse, loads).
    """
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file {path} is missing")
    with open(path, "rb") as f:
        if f.read(2) != _GZIP_MAGIC:
            raise ValueError(f"MNIST file {path} is not a gzip file (it does not start with the gzip magic 1f8b)")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except EOFError:
        raise ValueError(f"MNIST file {path} is truncated: the gzip stream ends before its end marker") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"MNIST file {path} is a corrupt gzip file: {err}") from None
    header = 4 + 4 * ndim
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"MNIST file {path} is not an idx file: magic number {data[:4].hex() or 'missing'}, "
                         f"expected 0000{_IDX_UBYTE:02x}{ndim:02x}")
    if data[2] != _IDX_UBYTE:
        raise ValueError(f"MNIST file {path} has idx type code 0x{data[2]:02x}; MNIST stores unsigned bytes "
                         f"(0x{_IDX_UBYTE:02x})")
    if data[3] != ndim:
        raise ValueError(f"MNIST file {path} has {data[3]} dimensions, expected {ndim} "
                         f"({'images N x H x W' if ndim == 3 else 'labels N'})")
    if len(data) < header:
        raise ValueError(f"MNIST file {path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        problem = "is truncated" if found < expected else f"has {found - expected} bytes past its data"
        raise ValueError(f"MNIST file {path} {problem}: header says {'x'.join(map(str, dims))} "
                         f"({expected} bytes), found {found} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
