"""One code path for score -> select -> reset: the central callback, the in-process federated server and the Flower
server (its strategy driven in process, through the real ClientApp) reach the same mask and the same reset values.

The three engines score the same forget data in different places (the central view of the federation's data;
each client on its shard, averaged by count on the server), so the scores agree to float rounding; the mask and
every parameter after the reset must agree bit for bit. BatchNorm statistics of the selected channels are
estimated where the data is (central retain batches vs. pooled client moments) and are not compared; every
other running statistic must be untouched in all three.
"""
from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from lightning.pytorch.callbacks import Callback

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.federated import FederatedSimulation
from lightning_unlearn.federated.flower import FederatedPartitions, UnlearnPlan, make_client_app
from lightning_unlearn.federated.flower.records import ByteCounter
from lightning_unlearn.federated.flower.server_app import MaskedUnlearning, deploy, discover_clients
from lightning_unlearn.federated.messages import Broadcast, Transport
from lightning_unlearn.federated.protocol import select_and_remove
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.models import SmallCNN

MODEL_FN = functools.partial(SmallCNN, channels=(8, 16), hidden=32, lr=3e-3)
PARTS = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)
REQUEST = ForgetRequest(classes=[3])


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages built outside a Flower run need the identity a SuperLink would give this process."""
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, getattr(TaskIdentity, key) or 1)


@pytest.fixture(scope="module")
def deployed():
    """A briefly trained global model (one FedAvg round of 10 local steps), the federation and its central view."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sim = FederatedSimulation(PARTS.datamodule(), MODEL_FN(), rounds=1, trainer_kwargs={"max_steps": 10}, progress=False)
    sim.train()
    sim.request(REQUEST)
    yield sim
    torch.set_num_threads(before)


class InProcessGrid:
    """The part of Flower's Grid the server uses, answering with the real ClientApp in this process."""

    def __init__(self, app, num_clients: int) -> None:
        self.app = app
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": num_clients})
                         for k in range(num_clients)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id  # as if the node had sent it
            replies.append(reply)
        return replies


class AfterReset(Callback):
    """Snapshot of the central model when training starts: scored, selected and reset, not yet repaired."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        trainer.should_stop = True


def _central(model, sim, config):
    selective, snapshot = SelectiveUnlearning(config, log_metrics=False), AfterReset()
    trainer = pl.Trainer(max_steps=1, callbacks=[selective, snapshot], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=sim.evaluation_datamodule)
    return selective.scores, selective.mask, snapshot.state


def _federated(model, sim, config):
    for client in sim.clients:
        client.deploy(Broadcast(get_arrays(model)))
    removal = select_and_remove(model, sim.clients, config.resolved(REQUEST, "federated"), Transport())
    return removal.scores, removal.mask, model.state_dict()


def _flower(model, sim, config):
    grid = InProcessGrid(make_client_app(MODEL_FN, PARTS), PARTS.num_clients)
    nodes = discover_clients(grid, PARTS.num_clients, timeout=10)
    arrays = get_arrays(model)
    deploy(grid, nodes, arrays, ByteCounter())
    strategy = MaskedUnlearning(model, nodes, UnlearnPlan(REQUEST, config, evaluate=False), ByteCounter())
    strategy.select(grid, arrays)
    strategy.remove(grid)
    return strategy.scores, strategy.mask, model.state_dict()


@pytest.mark.parametrize("reset", ["dampen", "reinit"])
def test_central_federated_and_flower_select_and_reset_alike(deployed, reset):
    sim = deployed
    config = UnlearnConfig(ratio=0.1, reset=reset, objective="retain", max_samples=100_000, early_stopping=False, seed=0)
    original = {k: v.clone() for k, v in sim.model.state_dict().items()}
    runs = {name: engine(copy.deepcopy(sim.model), sim, config)
            for name, engine in (("central", _central), ("federated", _federated), ("flower", _flower))}

    central_scores, central_mask, central_state = runs["central"]
    assert central_scores.num_samples == len(sim.plan.forget_indices)
    for name, (scores, mask, state) in runs.items():
        assert scores.num_samples == central_scores.num_samples, name
        for layer, s in central_scores.items():
            assert torch.allclose(scores[layer], s, rtol=1e-5, atol=1e-8), (name, layer)
        assert mask.sha256() == central_mask.sha256(), name
        assert mask.channels["fc2"] == [3]  # the forgotten class's head row
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var")):  # selected channels: estimated where the data is
                selected = mask.masks.get(key.rsplit(".", 1)[0] + ".weight")
                keep = ~selected if selected is not None else torch.ones_like(value, dtype=torch.bool)
                assert torch.equal(value[keep], original[key][keep]), (name, key)
            elif key.endswith("num_batches_tracked"):
                assert torch.equal(value, original[key]), (name, key)
            else:
                assert torch.equal(value, central_state[key]), (name, key)  # every parameter, bit for bit
        changed = [k for k in mask.masks if not torch.equal(state[k], original[k])]
        assert changed and all(mask.masks[k].any() for k in changed), (name, changed)  # only selected slices moved
