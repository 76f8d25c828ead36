"""The federated head calibration (``calibrate="head"``, a class request's default): after the masked rounds the
forgotten head rows are re-initialised and refit in federated rounds, every other element stays bit-equal to the
model after the masked rounds; settings the federation cannot calibrate with fail fast (or, asked by "auto", step
aside). tests/test_engine_parity.py checks that the in-process simulation and the Flower ClientApp calibrate alike."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.federated import federated_unlearn
from lightning_unlearn.federated.messages import Reply
from lightning_unlearn.federated.server import pool_head_features
from lightning_unlearn.mask.arrays import get_arrays
from federated_class3 import MODEL_FN, PARTS, REQUEST, trained_federation

SETTINGS = dict(ratio=0.1, max_samples=100_000, max_steps=5, calibrate_epochs=2, seed=0)


@pytest.fixture(scope="module")
def sim():
    yield from trained_federation()


def test_auto_calibrates_class_requests_and_only_the_forgotten_rows_move(sim):
    repaired = federated_unlearn(sim.model, sim.clients, REQUEST, calibrate="none", **SETTINGS)
    calibrated = federated_unlearn(sim.model, sim.clients, REQUEST, **SETTINGS)
    assert calibrated.config.calibrate == "head" and calibrated.extra["calibration_rounds"] == 2
    assert calibrated.mask.sha256() == repaired.mask.sha256()
    before, after = get_arrays(repaired.model), get_arrays(calibrated.model)
    for key, value in after.items():
        if key in ("fc2.weight", "fc2.bias"):
            assert torch.equal(value[[i for i in range(10) if i != 3]], before[key][[i for i in range(10) if i != 3]])
            assert not torch.equal(value[3], before[key][3]), key  # the forgotten row was refit
        else:
            assert torch.equal(value, before[key]), key  # outside the head rows: bit-equal to the masked rounds' model
    assert sim.evaluate(calibrated.model)["forget_acc"] == 0.0
    assert calibrated.bytes["calibration_features"] > 0 and calibrated.bytes["calibration"] > calibrated.bytes[
        "calibration_features"]


def test_calibration_settings_fail_fast_or_step_aside(sim):
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    with pytest.raises(ValueError, match="calibrate='head' needs a class request"):
        federated_unlearn(sim.model, sim.clients, ForgetRequest(clients=[1]), calibrate="head", **SETTINGS)
    # explicit "head" without the forgotten rows in the mask: one line, before the reset and any masked round
    with pytest.raises(ValueError, match=r"refits head rows \[3\] but the mask does not select them in fc2.weight"):
        federated_unlearn(sim.model, sim.clients, REQUEST, calibrate="head", head_rows=None, **SETTINGS)
    assert all(torch.equal(v, before[k]) for k, v in sim.model.state_dict().items())
    # "auto" leaves it out with a warning (as centrally)
    with pytest.warns(UserWarning, match="no head calibration"):
        skipped = federated_unlearn(sim.model, sim.clients, REQUEST, head_rows=None, **SETTINGS)
    assert skipped.config.calibrate == "none" and "calibration" not in skipped.bytes
    with pytest.raises(ValueError, match=r"objective='heldout' runs on the central engine only"):
        federated_unlearn(sim.model, sim.clients, REQUEST, objective="heldout", **SETTINGS)


def test_head_feature_replies_keep_their_contract():
    """The feature round's replies: one float64 (3, features) tensor per forgotten class, whole counts summing to
    the sample count; anything else stops the run with one line naming the client."""
    ok = Reply("bn_stats", {"class_3": torch.stack([torch.full((4,), 2.0), torch.ones(4) * 4, torch.ones(4) * 8])
                            .double()}, 2)
    empty = Reply("bn_stats", {"class_3": torch.zeros(3, 4, dtype=torch.float64)}, 0)
    assert torch.equal(pool_head_features([ok, empty], [3], 4)[3], torch.full((4,), 2.0))
    assert pool_head_features([empty], [3], 4) == {}  # no client holds the class: nothing to steer the rows by
    extra = Reply("bn_stats", {**ok.tensors, "x_train": torch.zeros(3, 4, dtype=torch.float64)}, 2)
    with pytest.raises(ValueError, match=r"^client 1: a 'bn_stats' reply has unexpected key 'x_train'"):
        pool_head_features([ok, replace(extra, client=1)], [3], 4)
    with pytest.raises(ValueError, match=r"^client 0: head features count 2 values from 5 samples$"):
        pool_head_features([Reply("bn_stats", ok.tensors, 5, client=0)], [3], 4)
    shifted = Reply("bn_stats", {"class_3": torch.zeros(3, 4, dtype=torch.float64).index_fill(0, torch.tensor([1]),
                                                                                             1e6)}, 0, client=1)
    with pytest.raises(ValueError, match=r"^client 1: a 'bn_stats' reply 'class_3' sums of squares are below"):
        pool_head_features([ok, shifted], [3], 4)  # no samples, yet sums that would move the pooled mean


def test_calibration_rounds_fit_the_rows_on_head_features_computed_once_per_node(sim, monkeypatch):
    """The calibration rounds run the central linear fit (no Lightning fit): each node computes its retain head
    features once (the body does not change between calibration rounds) and reuses them in later rounds."""
    from lightning_unlearn.federated import client

    calls, fits = [], []
    real_features, real_fit = client.head_features, client.local_fit

    def counting_features(model, head, batches):
        calls.append(len(batches.dataset))
        return real_features(model, head, batches)

    def no_calibration_fit(model, arrays, datamodule, config, *args, **kwargs):
        fits.append(config.get("train_rows"))
        return real_fit(model, arrays, datamodule, config, *args, **kwargs)

    monkeypatch.setattr(client, "head_features", counting_features)
    monkeypatch.setattr(client, "local_fit", no_calibration_fit)
    # seed 1: a body no earlier test calibrated (the nodes' cache would answer for one)
    result = federated_unlearn(sim.model, sim.clients, REQUEST, **dict(SETTINGS, calibrate_epochs=3, seed=1))
    assert result.extra["calibration_rounds"] == 3
    assert fits and all(rows is None for rows in fits)  # masked rounds only: the calibration trains no model
    forget_calls = PARTS.num_clients  # the head-feature round (iid: every client holds class 3)
    assert len(calls) == forget_calls + PARTS.num_clients  # retain features: once per node, not once per round
