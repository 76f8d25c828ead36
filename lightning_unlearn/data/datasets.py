"""Dataset readers and label access: the embedded digits default and MNIST from a path."""
from __future__ import annotations

import gzip
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
        images = _read_idx(folder / _MNIST_FILES[split][0]).astype(np.float32) / 255.0
        labels = _read_idx(folder / _MNIST_FILES[split][1]).astype(np.int64)
        x = torch.from_numpy(images).unsqueeze(1)
        if normalize:
            x = (x - MNIST_MEAN) / MNIST_STD
        out.append(TensorDataset(x, torch.from_numpy(labels)))
    return out[0], out[1]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
