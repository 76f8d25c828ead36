"""Flower apps: record round trips, local splits, bad input, and parity with the in-process simulation."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from lightning_unlearn import ForgetRequest
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn, run_fedavg
from lightning_unlearn.federated.federation import Federation, check_replies
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.federated import FederatedPartitions, make_client_app
from lightning_unlearn.federated.flower import FedAvgPlan, UnlearnPlan
from lightning_unlearn.federated.client import client_split
from lightning_unlearn.federated.flower.server_app import run_server
from lightning_unlearn.federated.partitions import FlowerDataError, file_partition, save_partition
from lightning_unlearn.federated.messages import (
    COUNT_BYTES, INDEX_BYTES, down, payload_bytes, read_down, read_reply, tensor_bytes, up,
)
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.mask import select_channels
from flower_support.faults import NODE_DIED, die_at
from flower_support.simulation import simulate  # Flower's own simulation engine running the library's apps

MODEL_FN = functools.partial(SmallCNN, channels=(8, 16), hidden=32, lr=3e-3)  # picklable: Flower ships it to workers
PARTS = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)


MESSAGES = LocalGrid(ClientApp(), 1)  # builds server messages outside a Flower run (public metadata)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _message(message_type: str) -> Message:
    return MESSAGES.create_message(down({}), message_type, 1, "")


# -- bad input ------------------------------------------------------------------------------------------
def test_client_that_cannot_reach_its_partition_fails_clearly(tmp_path):
    app = make_client_app(MODEL_FN, PARTS)
    with pytest.raises(FlowerDataError, match=r"no 'partition-id' in its node config"):
        app(_message("query.hello"), _context({}))
    with pytest.raises(FlowerDataError, match=r"partition-id=7 names no data partition; allowed ids are 0..2"):
        app(_message("train"), _context({"partition-id": 7, "num-partitions": 8}))
    deployed = make_client_app(MODEL_FN)  # deployment: the shard is a file on the node's disk
    with pytest.raises(FlowerDataError, match=r"no 'data-path' in its node config"):
        deployed(_message("query.hello"), _context({}))
    missing = tmp_path / "nowhere" / "client0.pt"
    with pytest.raises(FlowerDataError, match=rf"data-path='{missing}' does not exist on this node"):
        deployed(_message("query.hello"), _context({"data-path": str(missing)}))
    # the server stops on a failed client, naming it and its reason, instead of averaging fewer clients
    sent = MESSAGES.create_message(RecordDict(), "train", 5, "")
    remote = "Traceback (most recent call last):\n  File ...\nflwr.ClientAppException: \x1b[36mray\x1b[39m\n" \
             "lightning_unlearn.federated.partitions.FlowerDataError: data-path='/x' does not exist on this node\n"
    failed = Message(Error(code=0, reason=remote), reply_to=sent)
    with pytest.raises(RuntimeError, match=r"FedAvg round 0: 1 of 3 client\(s\) failed: node \d+: "
                                           r"lightning_unlearn\.federated\.partitions\.FlowerDataError: "
                                           r"data-path='/x' does not exist on this node$"):
        check_replies([failed], 3, "FedAvg round 0")
    with pytest.raises(RuntimeError, match=r"only 0 of 2 clients replied"):
        check_replies([], 2, "scoring")


def test_unlearning_without_federated_evaluation_sends_nothing(one_thread):
    grid = LocalGrid(make_client_app(MODEL_FN, PARTS), PARTS.num_clients)
    plan = UnlearnPlan(ForgetRequest(classes=[3]), evaluate=False, max_steps=1)
    result = run_server(grid, MODEL_FN(), PARTS.num_clients, None, plan)
    assert result.evaluation == [] and not [k for k in result.traffic.payload if k.startswith("evaluate")]
    assert [r["round"] for r in result.unlearning] == [0]
    with pytest.raises(ValueError, match="unknown objective 'forget_all'"):
        UnlearnPlan(ForgetRequest(classes=[3]), objective="forget_all")


def test_a_restarted_server_resumes_a_half_done_fedavg(tmp_path, one_thread):
    """The ServerApp's checkpoint holds FedAvg's rounds: a server that died in round 1 trains only round 1 again."""
    plan = FedAvgPlan(rounds=2, local_config={"max_steps": 2})

    def server(fail_at_train_message: int | None = None, checkpoint=None):
        torch.manual_seed(0)
        crash = die_at("train", fail_at_train_message)
        grid = LocalGrid(make_client_app(MODEL_FN, PARTS, mods=[crash]), PARTS.num_clients)
        return run_server(grid, MODEL_FN(), PARTS.num_clients, plan, checkpoint=checkpoint)

    straight = server()
    with pytest.raises(Exception, match=NODE_DIED):
        server(fail_at_train_message=4, checkpoint=tmp_path)  # round 0 sent 3 train messages, round 1 dies
    resumed = server(checkpoint=tmp_path)
    assert resumed.resumed == {"fedavg_rounds": 1, "mask": False, "rounds_done": 0}
    assert [r["round"] for r in resumed.training] == [0, 1]
    assert [r["bytes_up"] for r in resumed.training] == [r["bytes_up"] for r in straight.training]
    for k, v in straight.trained.items():  # same seeds per round: the same model, interrupted or not
        assert torch.allclose(resumed.trained[k], v, atol=1e-6), k


# -- records ---------------------------------------------------------------------------------------------
def test_records_round_trip_with_the_transports_byte_counts():
    torch.manual_seed(0)
    arrays, channels = {"w": torch.randn(4, 3), "b": torch.randn(4)}, {"conv1": (0, 2), "fc2": (3,)}
    content = down(arrays, {"seed": 3, "max_steps": None, "layers": ["conv1"]}, channels)
    assert payload_bytes(content) == tensor_bytes(arrays) + INDEX_BYTES * 3
    content["config"]["request"] = "{}"
    back, config, back_channels = read_down(content)
    assert back_channels == channels and config == {"seed": 3, "layers": ["conv1"], "request": "{}"}
    assert all(torch.equal(back[k], v) for k, v in arrays.items())
    ups = [("parameters", {"w": torch.randn(4, 3)}, 12, {"fit_s": 0.5}, {}),
           ("masked_update", {"w": torch.randn(6)}, 7, {}, {}),
           ("scores", {"conv1": torch.rand(8)}, 30, {}, dict(method="grad_x_act", tag="forget",
                                                              layers={"conv1": (8, "bn1", False)}))]
    for kind, tensors, n, metrics, meta in ups:
        content = up(kind, tensors, n, metrics, **meta)
        again = read_reply(content)
        assert again.kind == kind and again.num_samples == n and dict(again.metrics) == metrics
        assert all(torch.equal(again.tensors[k], v) for k, v in tensors.items())
        assert payload_bytes(content) == tensor_bytes(tensors) + COUNT_BYTES
    assert again.layers == {"conv1": (8, "bn1", False)} and again.method == "grad_x_act"
    assert read_reply(up(None)) is None and payload_bytes(up(None)) == 0
    # a client that smuggles labels is refused where the server reads the reply, as in-process
    smuggled = up("parameters", {"w": torch.randn(3)}, 3)
    smuggled["arrays"]["labels"] = Array(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"'arrays' must hold one array, 'packed'; got \['labels', 'packed'\]"):
        read_reply(smuggled)
    with pytest.raises(TypeError, match="must be a float tensor"):  # packed labels: read, then refused
        read_reply(up("parameters", {"w": torch.randn(3), "labels": torch.tensor([1, 2, 3])}, 3))


def test_local_split_matches_the_simulations_forget_plan(digits, tmp_path):
    fdm = PARTS.datamodule()
    requests = [ForgetRequest(classes=[3]), ForgetRequest(clients=[1]), ForgetRequest(sample_ids=list(range(0, 1300, 7)))]
    for request in requests:
        plan = fdm.forget_plan(request)
        for k in range(fdm.num_clients):
            part = PARTS(_context({"partition-id": k}))
            mine = client_split(request, part)
            assert np.array_equal(mine.forget, plan.splits[k].forget) and np.array_equal(mine.retain, plan.splits[k].retain)
    path = save_partition(fdm, 2, tmp_path / "client2.pt")  # deployment shard: same data, same ids
    loaded = file_partition(_context({"data-path": str(path)}))
    assert loaded.client_id == 2 and np.array_equal(loaded.sample_ids, fdm.client_indices(2))
    assert torch.equal(loaded.dataset.tensors[0][5], fdm.client_dataset(2)[5][0])
    sample = requests[-1]
    assert np.array_equal(client_split(sample, loaded).forget, fdm.forget_plan(sample).splits[2].forget)
    labels = loaded.targets  # read once per partition, not once per message naming a request
    assert np.array_equal(labels, loaded.dataset.tensors[1].numpy())
    client_split(requests[0], loaded)
    assert loaded.targets is labels
    blob = torch.load(path, weights_only=True)  # a node's file with a NaN pixel or a label out of range: refused
    blob["x"][4, 0, 1, 1] = float("nan")
    torch.save(blob, path)
    with pytest.raises(FlowerDataError, match=rf"^data-path='{re.escape(str(path))}': the input of sample 4 is not "
                                              r"finite \(nan at \[0, 1, 1\]\); inputs must be finite numbers$"):
        file_partition(_context({"data-path": str(path)}))
    blob["x"][4, 0, 1, 1], blob["y"][6] = 0.0, 10
    torch.save(blob, path)
    with pytest.raises(FlowerDataError, match=r"sample 6 has label 10; allowed labels are 0\.\.9 \(num_classes=10\)$"):
        file_partition(_context({"data-path": str(path)}))


@pytest.mark.slow
def test_simulation_stops_with_the_reason_of_a_node_without_its_partition():
    """3 nodes but a 2-client recipe: node 2 has no partition; the run stops with its error, not with 2 clients."""
    with pytest.raises(RuntimeError, match=r"hello: 1 of 3 client\(s\) failed: node \d+: [\w.]*FlowerDataError: "
                                           r"partition-id=2 names no data partition; allowed ids are 0..1$"):
        simulate(MODEL_FN, FederatedPartitions("digits", num_clients=2), 3, FedAvgPlan(rounds=1), timeout=300)


# -- parity with the in-process simulation ---------------------------------------------------------------------
@pytest.mark.slow
def test_flower_simulation_matches_in_process(digits):
    """Same init, schedule and seeds: same trained model, same scores and mask, same bytes per round, forgets alike."""
    torch.manual_seed(0)
    init = MODEL_FN()
    request = ForgetRequest(classes=[3])
    steps, unlearn = {"max_steps": 15}, dict(rounds=2, max_steps=5, ratio=0.1, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Flower workers (1 CPU each): same float reduction order
    try:
        fdm = PARTS.datamodule()
        sim = FederatedSimulation(fdm, MODEL_FN(), rounds=3, trainer_kwargs=steps, progress=False)
        sim.model.load_state_dict(init.state_dict())
        fed = Federation(sim.clients.grid, PARTS.num_clients)
        run_fedavg(sim.model, fed, 3, progress=False)
        sim.request(request)
        ours = federated_unlearn(sim.model, fed, request, **unlearn)
    finally:
        torch.set_num_threads(before)

    flower = simulate(MODEL_FN, PARTS, 3, FedAvgPlan(rounds=3), UnlearnPlan(request, **unlearn), initial_model=init,
                      trainer_kwargs=steps)

    for k, v in get_arrays(sim.model).items():  # FedAvg: same sampling, seeds and aggregation
        assert torch.allclose(flower.trained[k], v, atol=1e-5), k
    for name, s in ours.scores.items():
        assert torch.allclose(flower.scores[name], s, rtol=1e-4, atol=1e-7), name
    assert flower.mask.sha256() == ours.mask.sha256()
    model = MODEL_FN()
    model.load_state_dict(sim.model.state_dict())
    again = select_channels(flower.scores, model, 0.1, head_rows=[3])  # the mask is a function of the scores
    assert again.sha256() == flower.mask.sha256()
    # bytes per round: the same payload in both engines, every round
    for prefix in ("fedavg/", "deploy", "score", "unlearn/"):
        mine = [(b.down, b.up) for k, b in flower.traffic.payload.items() if k.startswith(prefix)]
        assert mine == [(b.down, b.up) for k, b in fed.traffic.payload.items() if k.startswith(prefix)] and mine, prefix
    assert [r["bytes_down"] for r in flower.unlearning] == [r["bytes_down"] for r in ours.history]
    # the Flower run forgets like the in-process run; frozen elements stay bit-exact
    unlearned = MODEL_FN()
    unlearned.load_state_dict(sim.model.state_dict())
    trained_state = {k: v.clone() for k, v in unlearned.state_dict().items()}
    unlearned.load_state_dict({**unlearned.state_dict(), **flower.arrays})
    assert frozen_elements_equal(unlearned, trained_state, flower.mask)
    original, mine, theirs = sim.evaluate(sim.model), sim.evaluate(unlearned), sim.evaluate(ours.model)
    assert original["forget_acc"] > 0.8
    assert mine["forget_acc"] < 0.5 * original["forget_acc"]
    assert abs(mine["forget_acc"] - theirs["forget_acc"]) < 0.1 and abs(mine["remaining_acc"] - theirs["remaining_acc"]) < 0.1
    assert flower.evaluation and flower.evaluation[-1]["forget_acc"] < 0.5  # the clients see it too
