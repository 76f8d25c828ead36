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


# -- partitioners: targets -> list of index arrays (disjoint, covering) -------------------------
def partition_iid(targets: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, near-equal shards."""
    perm = np.random.default_rng(seed).permutation(len(targets))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    targets: np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0, min_samples: int = 10, max_tries: int = 100
) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dirichlet(alpha) (Hsu et al. 2019)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha!r}")
    rng = np.random.default_rng(seed)
    floor = max(1, min(min_samples, len(targets) // num_clients))
    classes = np.unique(targets)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(targets == c))
            share = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                parts[k].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= floor:
            return out
    raise ValueError(
        f"could not give each of {num_clients} clients >= {floor} samples with alpha={alpha} in {max_tries} draws; "
        "use fewer clients or a larger alpha"
    )


def partition_shards(targets: np.ndarray, num_clients: int, classes_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; a class is split evenly among its holders."""
    classes = np.unique(targets)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in 1..{len(classes)} (classes present), got {classes_per_client}")
    if num_clients * classes_per_client < len(classes):
        raise ValueError(
            f"shards: {num_clients} clients x {classes_per_client} classes cannot cover {len(classes)} classes; "
            f"use classes_per_client >= {int(np.ceil(len(classes) / num_clients))}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [[order[(k * classes_per_client + j) % len(classes)] for j in range(classes_per_client)] for k in range(num_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [k for k in range(num_clients) if c in held[k]]
        idx = rng.permutation(np.flatnonzero(targets == c))
        for k, piece in zip(holders, np.array_split(idx, len(holders))):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


# -- per-client forget sets ---------------------------------------------------------------------
@dataclass
class ClientSplit:
    """What one client forgets and keeps for a request; indices are positions in the *client's* dataset."""

    client: int
    forget: np.ndarray
    retain: np.ndarray

    @property
    def leaving(self) -> bool:
        """True when the request takes all of this client's data (it only contributes scores)."""
        return len(self.retain) == 0


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
    """Shards any labelled map-style dataset into ``num_clients`` simulated clients.

    Args:
        partition: ``"iid"``, ``"dirichlet"`` (label skew set by ``alpha``) or ``"shards"``
            (``classes_per_client`` classes per client).
        alpha: Dirichlet concentration, > 0; only used by ``"dirichlet"``.
        min_client_samples: ``"dirichlet"`` redraws until each client has at least this many.

    ``client_indices(k)`` are indices into ``train_dataset``; ``client_dataloader(k)`` is client
    ``k``'s training loader, ``test_dataloader()`` the shared test loader and
    ``train_dataloader()`` the union (a centralised view, for comparison only).
    """

    def __init__(
        self,
        train_dataset: Dataset,
        test_dataset: Dataset,
        num_clients: int = 10,
        partition: str = "dirichlet",
        alpha: float = 0.5,
        seed: int = 0,
        batch_size: int = 64,
        classes_per_client: int = 2,
        num_workers: int = 0,
        num_classes: int | None = None,
        min_client_samples: int = 10,
    ) -> None:
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
            raise ValueError(
                f"num_clients={num_clients} is more than the {len(self.targets)} training samples; "
                f"allowed: 1..{len(self.targets)}"
            )
        self._num_clients, self.partition, self.alpha, self.seed = num_clients, partition, float(alpha), seed
        self.batch_size, self.classes_per_client, self.num_workers = batch_size, classes_per_client, num_workers
        self.min_client_samples = min_client_samples
        seen = int(max(self.targets.max(), int(test_targets.max()) if len(test_targets) else 0)) + 1
        self.num_classes = num_classes if num_classes is not None else seen
        self._parts: list[np.ndarray] | None = None

    # -- partition --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Compute the partition once (idempotent; the same seed gives the same clients)."""
        if self._parts is not None:
            return
        if self.partition == "iid":
            self._parts = partition_iid(self.targets, self._num_clients, self.seed)
        elif self.partition == "dirichlet":
            self._parts = partition_dirichlet(
                self.targets, self._num_clients, self.alpha, self.seed, self.min_client_samples
            )
        else:
            self._parts = partition_shards(self.targets, self._num_clients, self.classes_per_client, self.seed)

    @property
    def num_clients(self) -> int:
        return self._num_clients

    def _check_client(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self._num_clients:
            raise ValueError(f"client id {k!r} out of range; allowed ids are 0..{self._num_clients - 1}")

    def client_indices(self, k: int) -> np.ndarray:
        """Indices into ``train_dataset`` held by client ``k`` (sorted)."""
        self._check_client(k)
        self.setup()
        return self._parts[k]

    def client_dataset(self, k: int) -> Subset:
        return Subset(self.train_dataset, self.client_indices(k).tolist())

    def client_dataloader(self, k: int, shuffle: bool = True, seed: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed) if shuffle else None
        return DataLoader(
            self.client_dataset(k), batch_size=self.batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """All clients' data in one loader: the centralised view (never used by the federated server)."""
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=max(256, self.batch_size), num_workers=self.num_workers)

    # -- summary ----------------------------------------------------------------------------
    def class_histogram(self) -> np.ndarray:
        """``(num_clients, num_classes)`` sample counts."""
        self.setup()
        return np.stack([np.bincount(self.targets[p], minlength=self.num_classes) for p in self._parts])

    def summary(self) -> list[dict]:
        """One row per client: samples, classes held, class histogram."""
        hist = self.class_histogram()
        return [
            {"client": k, "samples": int(h.sum()), "classes": int((h > 0).sum()), "histogram": h.tolist()}
            for k, h in enumerate(hist)
        ]

    def summary_table(self) -> str:
        """The partition as a fixed-width text table (clients x classes)."""
        hist = self.class_histogram()
        width = max(5, len(str(int(hist.max()))) + 1)
        head = "client  samples " + "".join(f"{c:>{width}}" for c in range(self.num_classes))
        rows = [f"{k:>6}  {int(h.sum()):>7} " + "".join(f"{int(v):>{width}}" for v in h) for k, h in enumerate(hist)]
        title = f"partition={self.partition}" + (f" alpha={self.alpha:g}" if self.partition == "dirichlet" else "")
        return "\n".join([f"{title} seed={self.seed}", head, *rows])

    def plot_partition(self, path: str | Path | None = None):
        """Stacked bar chart of each client's class histogram; saved to ``path`` when given. Returns the figure."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.class_histogram()
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * self._num_clients + 2), 3.5))
        bottom = np.zeros(self._num_clients)
        colors = plt.get_cmap("tab10" if self.num_classes <= 10 else "tab20")
        for c in range(self.num_classes):
            ax.bar(np.arange(self._num_clients), hist[:, c], bottom=bottom, label=str(c), color=colors(c % colors.N))
            bottom += hist[:, c]
        ax.set_xlabel("client")
        ax.set_ylabel("samples")
        ax.set_title(f"{self.partition} partition" + (f" (alpha={self.alpha:g})" if self.partition == "dirichlet" else ""))
        ax.legend(title="class", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig

    # -- forget requests ----------------------------------------------------------------------
    def forget_plan(self, request: ForgetRequest) -> FederatedForgetPlan:
        """Resolve ``request`` per client; fails fast on a request that does not fit the federation. A client
        left without retain data still scores but takes no part in the later rounds."""
        self.setup()
        present = sorted(int(c) for c in np.unique(self.targets))
        if request.kind == "client":
            bad = [c for c in request.clients if not 0 <= c < self._num_clients]
            if bad:
                raise ValueError(f"client id(s) {bad} out of range; allowed ids are 0..{self._num_clients - 1}")
            if len(request.clients) >= self._num_clients:
                raise ValueError(f"forgetting clients {list(request.clients)} would leave no client to retain")
        else:
            if request.kind == "class":  # an unknown class is request.validate's error
                absent = [c for c in request.classes if 0 <= c < self.num_classes and c not in present]
                if absent:
                    raise ValueError(f"class(es) {absent} are held by no client; classes held are {present}")
            request.validate(torch.as_tensor(self.targets), self.num_classes)
        owner = np.empty(len(self.targets), dtype=np.int64)
        for k, part in enumerate(self._parts):
            owner[part] = k
        forget = request.resolve(self.targets, clients=owner)
        splits = []
        for k, part in enumerate(self._parts):
            local = forget[part]
            splits.append(ClientSplit(k, np.flatnonzero(local), np.flatnonzero(~local)))
        dropped = [s.client for s in splits if s.leaving]
        if not any(len(s.retain) for s in splits):
            raise ValueError(f"{request.to_dict()} leaves no client with data to retain")
        involuntary = [s.client for s in splits if s.leaving and not (request.kind == "client" and s.client in request.clients)]
        if involuntary:
            warnings.warn(
                f"{request.to_dict()} takes all data of client(s) {involuntary}: they contribute scores "
                "but are dropped from the unlearning and retraining rounds",
                UserWarning,
                stacklevel=2,
            )
        return FederatedForgetPlan(request, splits, np.flatnonzero(forget), dropped)
