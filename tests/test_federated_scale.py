"""Bounded memory at 100 clients (issue 16, item 3): clients share one working model, and a round with
client sampling touches only the sampled clients. Small and fast: digits, one local step."""
from __future__ import annotations

import pytest
import torch

from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import make_clients, run_fedavg
from lightning_unlearn.federated.messages import tensor_bytes
from lightning_unlearn.models import SmallCNN

from federated_log import recording


@pytest.fixture(scope="module")
def hundred(digits):
    fdm = FederatedDataModule(*digits, num_clients=100, partition="dirichlet", alpha=0.1, seed=0, batch_size=16,
                              min_client_samples=1)
    torch.manual_seed(0)
    model = SmallCNN()
    return fdm, model, make_clients(fdm, model)


def _storages(clients) -> set[int]:
    return {p.untyped_storage().data_ptr() for c in clients for p in c.model.parameters()}


def test_hundred_clients_hold_one_model_between_them(hundred):
    fdm, model, clients = hundred
    assert len(clients) == 100 and sorted(c.client_id for c in clients) == list(range(100))
    assert len({id(c.model) for c in clients}) == 1  # one working copy, not one per client
    assert clients[0].model is not model  # ... and not the server's model either
    assert len(_storages(clients)) == sum(1 for _ in model.parameters())  # one model's storages, not 100 x
    # what a client keeps of its own is its shard's indices, not data or weights
    assert sum(len(fdm.client_indices(k)) for k in range(100)) == len(fdm.targets)


def test_sampled_rounds_reach_only_the_sampled_clients_and_keep_one_model(hundred, one_thread):
    _, model, clients = hundred
    grid = recording(clients)
    result = run_fedavg(model, clients, rounds=2, fraction=0.1, seed=0, progress=False,
                        local_config={"max_steps": 1}, deploy=False)
    for r, row in enumerate(result.history):
        reached = {cid for cid, op, m, _ in grid.log if op == "train" and m.metadata.group_id == f"fedavg/{r}"}
        assert len(row["clients"]) == 10 and reached == set(row["clients"])
        # the server held 10 replies (one model each), never 100
        assert row["bytes_up"] <= 10 * (tensor_bytes(model.state_dict()) + 8)
    assert result.history[0]["clients"] != result.history[1]["clients"]  # a new draw each round
    assert len({id(c.model) for c in clients}) == 1 and len(_storages(clients)) == sum(1 for _ in model.parameters())
