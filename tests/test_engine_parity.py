"""One code path for score -> select -> reset: the central callback and the federated phases, on the in-process
simulation's clients and on the Flower apps' ClientApp (both on a LocalGrid), reach the same mask and the same
reset values; with the head calibration (a class request's default) the simulation and the Flower apps reach the
same final model.

The engines score the same forget data in different places (the central view of the federation's data; each
client on its shard, averaged by count on the server), so the scores agree to float rounding; the mask and
every parameter after the reset must agree bit for bit. BatchNorm statistics of the selected channels are
estimated where the data is (central retain batches vs. pooled client moments) and are not compared; every
other running statistic must be untouched in all three.
"""
from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_unlearn import UnlearnConfig
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.federated import federated_unlearn
from lightning_unlearn.federated.flower.server_app import UnlearnPlan, run_server
from lightning_unlearn.federated.fedavg import deploy_model
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated import make_client_app
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.protocol import remove, select
from lightning_unlearn.mask.arrays import get_arrays
from federated_class3 import MODEL_FN, PARTS, REQUEST, trained_federation


@pytest.fixture(scope="module")
def deployed():
    """A briefly trained global model (one FedAvg round of 10 local steps), the federation and its central view."""
    yield from trained_federation()


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


def _phases(model, fed, config):
    deploy_model(fed, get_arrays(model))
    fed.request = REQUEST
    cfg = config.resolved(REQUEST, "federated")
    scores, mask = select(fed, model, cfg)
    remove(fed, model, mask, cfg)
    return scores, mask, model.state_dict()


def _federated(model, sim, config):
    return _phases(model, Federation(sim.clients.grid, len(sim.clients)), config)


def _flower(model, sim, config):
    grid = LocalGrid(make_client_app(MODEL_FN, PARTS), PARTS.num_clients)
    return _phases(model, Federation(grid, PARTS.num_clients, timeout=10), config)


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


def test_federated_and_flower_calibrate_alike(deployed):
    """The whole federated procedure with the head calibration (``calibrate="auto"``: head on a class request):
    ``federated_unlearn`` on the simulation's clients and ``run_server`` on the Flower ClientApp run the same phases
    and end at the same mask and the same parameters, bit for bit."""
    sim = deployed
    settings = dict(ratio=0.1, max_samples=100_000, max_steps=3, calibrate_epochs=2, seed=0)
    in_process = federated_unlearn(sim.model, sim.clients, REQUEST, **settings)
    model = MODEL_FN()
    model.load_state_dict(sim.model.state_dict())
    # a calibration round is one local epoch under the clients' own Trainer options (the simulation's: 10 steps)
    grid = LocalGrid(make_client_app(MODEL_FN, PARTS, trainer_kwargs={"max_steps": 10}), PARTS.num_clients)
    flower = run_server(grid, model, PARTS.num_clients, None, UnlearnPlan(REQUEST, rounds=1, evaluate=False, **settings),
                        timeout=30)
    assert in_process.config.calibrate == flower.plan.config.calibrate == "head"
    assert flower.mask.sha256() == in_process.mask.sha256() and len(flower.calibration) == 2
    final = get_arrays(in_process.model)
    assert not torch.equal(final["fc2.weight"][3], sim.model.fc2.weight[3])  # the forgotten row was refit
    for key, value in final.items():
        assert torch.equal(flower.arrays[key], value), key
