"""FederatedDataModule: partitions, summaries, request resolution and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.data.datasets import dataset_targets
from lightning_unlearn.data.federated import partition_dirichlet


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_partitions_reproducible_disjoint_and_covering(digits, partition):
    train, test = digits
    make = lambda seed: FederatedDataModule(train, test, num_clients=7, partition=partition, alpha=0.5, seed=seed)  # noqa: E731
    a, b, c = make(0), make(0), make(1)
    for dm in (a, b, c):
        dm.setup("fit")
    parts = [a.client_indices(k) for k in range(a.num_clients)]
    assert all(np.array_equal(p, b.client_indices(k)) for k, p in enumerate(parts))
    assert any(not np.array_equal(p, c.client_indices(k)) for k, p in enumerate(parts))
    everything = np.concatenate(parts)
    assert len(everything) == len(np.unique(everything)) == len(train)  # disjoint and covering
    assert min(len(p) for p in parts) > 0


def _skew(hist: np.ndarray) -> float:
    """Mean over clients of the largest class share (1/C for a perfectly balanced client)."""
    return float(np.mean(hist.max(1) / hist.sum(1)))


def test_dirichlet_skew_follows_alpha(digits):
    targets = dataset_targets(digits[0]).numpy()
    skews = {}
    for alpha in (0.1, 1.0, 100.0):
        hists = [np.stack([np.bincount(targets[p], minlength=10) for p in partition_dirichlet(targets, 10, alpha, s)])
                 for s in range(3)]
        skews[alpha] = np.mean([_skew(h) for h in hists])
    assert skews[0.1] > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.2  # near-iid: no class dominates a client
    assert skews[0.1] > 0.5  # strong skew: most of a client's data is one class


def test_shards_give_each_client_its_classes(digits):
    dm = FederatedDataModule(*digits, num_clients=5, partition="shards", classes_per_client=2, seed=0)
    hist = dm.class_histogram()
    assert ((hist > 0).sum(1) == 2).all()
    assert (hist.sum(0) > 0).all()  # every class held by someone


def test_summary_table_and_plot(digits, tmp_path):
    dm = FederatedDataModule(*digits, num_clients=4, seed=0)
    hist = dm.class_histogram()
    assert hist.sum(1).tolist() == [len(dm.client_indices(k)) for k in range(4)]
    assert hist.sum() == len(digits[0])
    table = dm.summary_table()
    assert len(table.splitlines()) == 2 + 4 and "alpha=0.5" in table
    dm.plot_partition(tmp_path / "partition.png")
    assert (tmp_path / "partition.png").stat().st_size > 1000


def test_client_dataset_serves_only_its_shard(digits):
    dm = FederatedDataModule(*digits, num_clients=3, seed=0, batch_size=1000)
    y = dataset_targets(dm.client_dataset(1))
    idx = dm.client_indices(1)
    assert torch.equal(y, dataset_targets(digits[0])[torch.as_tensor(idx)])


# -- requests -------------------------------------------------------------------------------------
def test_forget_plan_per_client(digits):
    dm = FederatedDataModule(*digits, num_clients=4, seed=0)
    targets = dataset_targets(digits[0]).numpy()
    plan = dm.forget_plan(ForgetRequest(classes=[3]))
    for s in plan.splits:
        local = targets[dm.client_indices(s.client)]
        assert (local[s.forget] == 3).all() and (local[s.retain] != 3).all()
    assert np.array_equal(np.sort(plan.forget_indices), np.flatnonzero(targets == 3))
    plan = dm.forget_plan(ForgetRequest(clients=[2]))
    assert plan.dropped == [2] and plan.forgetting_clients == [2] and 2 not in plan.retaining_clients
    ids = dm.client_indices(0)[:5].tolist() + dm.client_indices(3)[:2].tolist()
    plan = dm.forget_plan(ForgetRequest(sample_ids=ids))
    assert plan.forgetting_clients == [0, 3] and len(plan.splits[0].forget) == 5


# -- bad input ------------------------------------------------------------------------------------
def test_alpha_must_be_positive(digits):
    with pytest.raises(ValueError, match=r"alpha must be > 0.*-1"):
        FederatedDataModule(*digits, alpha=-1)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        FederatedDataModule(*digits, alpha=0)


def test_more_clients_than_samples():
    tiny = TensorDataset(torch.zeros(5, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"num_clients=6 .* 5 training samples; allowed: 1\.\.5"):
        FederatedDataModule(tiny, tiny, num_clients=6)


def test_unknown_partition(digits):
    with pytest.raises(ValueError, match=r"unknown partition 'zipf'.*\['iid', 'dirichlet', 'shards'\]"):
        FederatedDataModule(*digits, partition="zipf")


def test_client_id_out_of_range(digits):
    dm = FederatedDataModule(*digits, num_clients=4)
    with pytest.raises(ValueError, match=r"client id 4 out of range; allowed ids are 0\.\.3"):
        dm.client_indices(4)
    with pytest.raises(ValueError, match=r"client id\(s\) \[7\] out of range; allowed ids are 0\.\.3"):
        dm.forget_plan(ForgetRequest(clients=[7]))
    with pytest.raises(ValueError, match="no client to retain"):
        dm.forget_plan(ForgetRequest(clients=[0, 1, 2, 3]))


def test_class_no_client_holds(digits):
    train, test = digits
    y = dataset_targets(train)
    keep = torch.nonzero(y != 9).flatten()
    without_nine = TensorDataset(train.tensors[0][keep], y[keep])
    dm = FederatedDataModule(without_nine, test, num_clients=3, num_classes=10)
    with pytest.raises(ValueError, match=r"class\(es\) \[9\] are held by no client; classes held are \[0, 1, .*8\]"):
        dm.forget_plan(ForgetRequest(classes=[9]))
    with pytest.raises(ValueError, match=r"unknown class"):
        dm.forget_plan(ForgetRequest(classes=[12]))


def test_request_that_empties_a_client_drops_it_with_a_warning(digits):
    dm = FederatedDataModule(*digits, num_clients=10, partition="shards", classes_per_client=1, seed=0)
    holder = int(np.flatnonzero(dm.class_histogram()[:, 4])[0])
    with pytest.warns(UserWarning, match=rf"all data of client\(s\) \[{holder}\].*dropped from the unlearning"):
        plan = dm.forget_plan(ForgetRequest(classes=[4]))
    assert plan.dropped == [holder] and holder in plan.forgetting_clients and holder not in plan.retaining_clients


def test_sample_request_out_of_range(digits):
    dm = FederatedDataModule(*digits, num_clients=3)
    n = len(digits[0])
    with pytest.raises(ValueError, match=rf"sample id\(s\) \[{n}\] out of range; allowed ids are 0\.\.{n - 1}"):
        dm.forget_plan(ForgetRequest(sample_ids=[0, n]))
