"""Simulated federation: shard a labelled dataset into clients and resolve forget requests per client."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_unlearn.data.validation import checked_targets
from lightning_unlearn.request import ForgetRequest

PARTITIONS = ("iid", "dirichlet", "shards")


# partitioners: targets -> sorted index arrays, disjoint and covering
def partition_iid(targets: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, near-equal shards."""
    perm = np.random.default_rng(seed).permutation(len(targets))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(targets: np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0,
                        min_samples: int = 10, max_tries: int = 100) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dirichlet(alpha) (Hsu et al. 2019)."""
    rng = np.random.default_rng(seed)
    floor = max(1, min(min_samples, len(targets) // num_clients))
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(targets):
            idx = rng.permutation(np.flatnonzero(targets == c))
            share = rng.dirichlet(np.full(num_clients, float(alpha)))
            for k, piece in enumerate(np.split(idx, (np.cumsum(share)[:-1] * len(idx)).astype(int))):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= floor:
            return out
    raise ValueError(f"could not give each of {num_clients} clients >= {floor} samples with alpha={alpha} in "
                     f"{max_tries} draws; use fewer clients or a larger alpha")


def partition_shards(targets: np.ndarray, num_clients: int, classes_per_client: int = 2,
                     seed: int = 0) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; a class is split evenly among its holders."""
    classes = np.unique(targets)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in 1..{len(classes)} (classes present), got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(f"shards: {num_clients} clients x {classes_per_client} classes cannot cover {len(classes)} "
                         f"classes; use classes_per_client >= {int(np.ceil(len(classes) / num_clients))}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [order[(k * classes_per_client + np.arange(classes_per_client)) % len(classes)] for k in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [k for k in range(num_clients) if c in held[k]]
        idx = rng.permutation(np.flatnonzero(targets == c))
        for k, piece in zip(holders, np.array_split(idx, len(holders))):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


@dataclass
class ClientSplit:
    """What one client forgets and keeps for a request (positions in the client's own dataset)."""

    client: int
    forget: np.ndarray
    retain: np.ndarray  # empty: the request takes all its data, the client only contributes scores


@dataclass
class FederatedForgetPlan:
    """A request resolved against the partition: per-client splits and the global forget indices."""

    request: ForgetRequest
    splits: list[ClientSplit]
    forget_indices: np.ndarray  # into the full training dataset
    dropped: list[int] = field(default_factory=list)  # clients left without retain data

    @property
    def forgetting_clients(self) -> list[int]:
        return [s.client for s in self.splits if len(s.forget)]

    @property
    def retaining_clients(self) -> list[int]:
        return [s.client for s in self.splits if len(s.retain)]


class FederatedDataModule(LightningDataModule):
    """Shards a labelled map-style dataset into ``num_clients`` simulated clients: ``partition`` ``"iid"``,
    ``"dirichlet"`` (label skew set by ``alpha`` > 0; redrawn until every client has ``min_client_samples``) or
    ``"shards"`` (``classes_per_client`` classes each). ``train_dataloader()``: all clients' data, for comparison."""

    def __init__(self, train_dataset: Dataset, test_dataset: Dataset, num_clients: int = 10,
                 partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0, batch_size: int = 64,
                 classes_per_client: int = 2, num_workers: int = 0, num_classes: int | None = None,
                 min_client_samples: int = 10) -> None:
        super().__init__()
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; allowed partitions are {list(PARTITIONS)}")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
        if partition == "dirichlet" and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.targets = checked_targets(train_dataset, "training dataset", num_classes).numpy()
        test_targets = checked_targets(test_dataset, "test dataset", num_classes)
        if num_clients > len(self.targets):
            raise ValueError(f"num_clients={num_clients} is more than the {len(self.targets)} training samples; "
                             f"allowed: 1..{len(self.targets)}")
        self.num_clients, self.partition, self.alpha, self.seed = num_clients, partition, float(alpha), seed
        self.batch_size, self.num_workers = batch_size, num_workers
        seen = int(max(self.targets.max(), int(test_targets.max()) if len(test_targets) else 0)) + 1
        self.num_classes = num_classes if num_classes is not None else seen
        if partition == "iid":  # drawn once, here: the same seed gives the same clients
            self._parts = partition_iid(self.targets, num_clients, seed)
        elif partition == "dirichlet":
            self._parts = partition_dirichlet(self.targets, num_clients, self.alpha, seed, min_client_samples)
        else:
            self._parts = partition_shards(self.targets, num_clients, classes_per_client, seed)

    def client_indices(self, k: int) -> np.ndarray:
        """Indices into ``train_dataset`` held by client ``k`` (sorted)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_clients:
            raise ValueError(f"client id {k!r} out of range; allowed ids are 0..{self.num_clients - 1}")
        return self._parts[k]

    def client_dataset(self, k: int) -> Subset:
        return Subset(self.train_dataset, self.client_indices(k).tolist())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=max(256, self.batch_size), num_workers=self.num_workers)

    def class_histogram(self) -> np.ndarray:
        """``(num_clients, num_classes)`` sample counts: what the table and the plot show."""
        return np.stack([np.bincount(self.targets[p], minlength=self.num_classes) for p in self._parts])

    def _title(self) -> str:
        return f"{self.partition} partition" + (f" (alpha={self.alpha:g})" if self.partition == "dirichlet" else "")

    def summary_table(self) -> str:
        """The partition as a fixed-width text table (clients x classes)."""
        hist = self.class_histogram()
        width = max(5, len(str(int(hist.max()))) + 1)
        head = "client  samples " + "".join(f"{c:>{width}}" for c in range(self.num_classes))
        rows = [f"{k:>6}  {int(h.sum()):>7} " + "".join(f"{int(v):>{width}}" for v in h) for k, h in enumerate(hist)]
        return "\n".join([f"{self._title()}, seed {self.seed}", head, *rows])

    def plot_partition(self, path: str | Path | None = None):
        """Stacked bar chart of each client's class histogram; saved to ``path`` when given. Returns the figure."""
        import matplotlib
        from matplotlib.figure import Figure

        hist, clients = self.class_histogram(), np.arange(self.num_clients)
        fig = Figure(figsize=(max(4, 0.5 * self.num_clients + 2), 3.5))
        ax = fig.subplots()
        colors = matplotlib.colormaps["tab10" if self.num_classes <= 10 else "tab20"]
        for c in range(self.num_classes):
            ax.bar(clients, hist[:, c], bottom=hist[:, :c].sum(1), label=str(c), color=colors(c % colors.N))
        ax.set(xlabel="client", ylabel="samples", title=self._title())
        ax.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig

    def forget_plan(self, request: ForgetRequest) -> FederatedForgetPlan:
        """Resolve ``request`` per client, failing fast on one that does not fit the federation. A client left
        without retain data still scores but takes no part in the later rounds."""
        n = self.num_clients
        if request.kind == "client":
            if bad := [c for c in request.clients if not 0 <= c < n]:
                raise ValueError(f"client id(s) {bad} out of range; allowed ids are 0..{n - 1}")
            if len(request.clients) >= n:
                raise ValueError(f"forgetting clients {list(request.clients)} would leave no client to retain")
        else:
            present = sorted(int(c) for c in np.unique(self.targets))  # an unknown class is request.validate's error
            if absent := [c for c in request.classes if 0 <= c < self.num_classes and c not in present]:
                raise ValueError(f"class(es) {absent} are held by no client; classes held are {present}")
            request.validate(torch.as_tensor(self.targets), self.num_classes)
        forgets = [request.resolve(self.targets[p], sample_ids=p, clients=np.full(len(p), k))
                   for k, p in enumerate(self._parts)]  # as each node resolves its own (federated.client.client_split)
        splits = [ClientSplit(k, np.flatnonzero(f), np.flatnonzero(~f)) for k, f in enumerate(forgets)]
        dropped = [s.client for s in splits if not len(s.retain)]
        if len(dropped) == n:
            raise ValueError(f"{request.to_dict()} leaves no client with data to retain")
        if involuntary := [c for c in dropped if c not in request.clients]:
            warnings.warn(f"{request.to_dict()} takes all data of client(s) {involuntary}: they contribute scores "
                          "but are dropped from the unlearning and retraining rounds", stacklevel=2)
        forget = np.sort(np.concatenate([part[s.forget] for part, s in zip(self._parts, splits)]))
        return FederatedForgetPlan(request, splits, forget, dropped)
