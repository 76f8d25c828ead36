"""Federated training and unlearning on digits: boundary, exact freeze, each request kind, baselines, resume."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from lightning_unlearn import ForgetRequest, ParameterMask
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn, make_clients, run_fedavg
from lightning_unlearn.federated.checkpoint import ServerCheckpoint
from lightning_unlearn.federated.messages import Reply, read_reply, up
from lightning_unlearn.federated.server import aggregate_scores, fedavg_aggregate, masked_aggregate
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn._io import write_json
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import SmallCNN

from federated_log import exchanges, recording

TINY = dict(channels=(8, 16), hidden=32, lr=3e-3)
STEPS = {"max_steps": 10}


def _model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(**TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sim(digits, one_thread):
    """A 4-client federation trained for 5 short rounds (test acc ~0.9), updates stored for FedEraser."""
    fdm = FederatedDataModule(*digits, num_clients=4, partition="dirichlet", alpha=1.0, seed=0, batch_size=32)
    s = FederatedSimulation(fdm, _model(), rounds=5, store_every=2, trainer_kwargs=STEPS, progress=False)
    s.train()
    return s


# -- the client/server boundary ---------------------------------------------------------------------
def test_replies_refuse_samples_and_labels():
    with pytest.raises(TypeError, match="float tensor"):
        read_reply(up("parameters", {"labels": torch.tensor([1, 2, 3])}, 3))
    with pytest.raises(ValueError, match=r"'conv1' has shape \(32, 8\), expected \(8,\)"):  # a per-sample score matrix
        aggregate_scores([Reply("scores", {"conv1": torch.rand(32, 8)}, 32, method="grad_x_act",
                                layers={"conv1": (8, None, False)})])
    with pytest.raises(ValueError, match="sample count 'num-examples' as an int"):
        read_reply(up("masked_update", {"w": torch.rand(3)}, 2.5))
    listed = up("parameters", {"w": torch.rand(3)}, 3)
    listed["metrics"] = MetricRecord({"num-examples": 3, "fit_s": [0.1, 0.2]})  # per-sample values as a list
    with pytest.raises(ValueError, match="scalar"):
        read_reply(listed)


def test_server_functions_type_check_their_inputs(digits):
    with pytest.raises(TypeError, match=r"expects a 'parameters' reply here, got Tensor"):
        fedavg_aggregate([torch.rand(4)], {})
    with pytest.raises(TypeError, match="got TensorDataset"):
        aggregate_scores([digits[0]])
    with pytest.raises(TypeError, match="got a 'parameters' reply"):
        masked_aggregate({}, ParameterMask({}), [Reply("parameters", {"w": torch.rand(2)}, 2)])


def _walk(obj, seen=None):
    """Every leaf value reachable from a message (fields, mappings, sequences)."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def test_only_parameters_updates_and_scores_cross_the_boundary(sim):
    """Record every message of a FedAvg round and a federated unlearning run and inspect each one."""
    model = _model(1)
    clients = make_clients(sim.fdm, model, trainer_kwargs={"max_steps": 2})
    grid = recording(clients)
    run_fedavg(model, clients, rounds=1, progress=False)
    plan = sim.fdm.forget_plan(ForgetRequest(classes=[3]))
    # a reset (and its statistics round) without the head calibration; tests/test_federated_calibration.py
    # inspects the calibration's messages
    # (two rounds exactly: tests/test_federated_recovery.py inspects the stopping rule's evaluation messages)
    result = federated_unlearn(model, clients, plan.request, rounds=2, max_steps=2, reset="dampen", calibrate="none",
                               early_stopping=False)
    log = exchanges(grid)

    state_shapes = {k: v.shape for k, v in get_arrays(model).items()}
    channels = {n: i.out_channels for n, i in result.scores.layers.items()}
    selected = {n: int(m.sum()) for n, m in result.mask.masks.items() if m.any()}
    sizes = {len(c.dataset) for c in clients} | {len(s.retain) for s in plan.splits} | {len(s.forget) for s in plan.splits}
    ups = [m for d, _, _, m in log if d == "up"]
    assert {m.kind for m in ups} == {"parameters", "scores", "bn_stats", "masked_update"}
    bn_selected = {n: int(m.sum()) for n, m in result.mask.masks.items() if m.any() and n.startswith("bn")
                   and n.endswith(".weight")}
    for m in ups:
        if m.kind == "parameters":
            assert {k: v.shape for k, v in m.tensors.items()} == state_shapes
        elif m.kind == "scores":
            assert {k: v.numel() for k, v in m.tensors.items()} == channels
        elif m.kind == "bn_stats":  # per-channel moments of the selected BatchNorm channels only
            assert {k: tuple(v.shape) for k, v in m.tensors.items()} == {k[:-len(".weight")]: (3, n)
                                                                         for k, n in bn_selected.items()}
        else:
            assert {k: v.numel() for k, v in m.tensors.items()} == selected
        assert m.num_samples in sizes
        for leaf in _walk(m):  # nothing but tensors of the shapes above, names, counts, scalars
            assert isinstance(leaf, (torch.Tensor, str, int, float, bool, type(None))), type(leaf)
            assert not isinstance(leaf, (Dataset, DataLoader, np.ndarray))
    downs = [m for d, _, _, m in log if d == "down"]
    assert all(set(vars(m)) == {"arrays", "config", "channels", "nbytes"} for m in downs)
    # reset: the statistics round and round 0 send the mask and the reset selected slices, round 1 the slices only
    masked_downs = [m for d, _, op, m in log if d == "down" and op == "train.unlearn"]
    assert all(m.channels for m in masked_downs[: len(clients)])
    assert all(m.channels is None for m in masked_downs[len(clients):])
    stats = {f"{k[:-len('.weight')]}.{b}" for k in bn_selected for b in ("running_mean", "running_var")}
    for m in masked_downs:  # the selected slices, and the pooled statistics of the selected BatchNorm channels
        assert {k: v.numel() for k, v in m.arrays.items() if k in selected} == selected
        assert set(m.arrays) - set(selected) == stats
    # every client kept exactly the server's mask (channel indices) in its own state
    kept = [{n: v.tolist() for n, v in c.state["mask"].to_torch_state_dict().items()} for c in grid.contexts.values()]
    assert all(k == result.mask.channels for k in kept)


# -- exact freeze after aggregation -----------------------------------------------------------------------
def test_masked_aggregate_is_bit_exact_outside_the_mask():
    torch.manual_seed(0)
    reference = {"w": torch.randn(6, 5), "b": torch.randn(6)}
    mask = ParameterMask({"w": torch.zeros(6, 5, dtype=torch.bool), "b": torch.zeros(6, dtype=torch.bool)})
    mask.masks["w"][[1, 4]] = True
    mask.masks["b"][4] = True
    msgs = [Reply("masked_update", {"w": torch.randn(10), "b": torch.randn(1)}, n) for n in (10, 30, 60)]
    out = masked_aggregate(reference, mask, msgs)
    for name in reference:
        keep = mask.masks[name]
        assert torch.equal(out[name][~keep], reference[name][~keep])
        expected = sum(w * m.tensors[name].double() for w, m in zip((0.1, 0.3, 0.6), msgs)).float()
        assert torch.allclose(out[name][keep], expected)
    with pytest.raises(ValueError, match="values for 10 selected"):
        masked_aggregate(reference, mask, [Reply("masked_update", {"w": torch.randn(3), "b": torch.randn(1)}, 1)])


def test_masked_federated_rounds_keep_frozen_elements_bit_exact(sim):
    sim.request(ForgetRequest(classes=[3]))
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    result = federated_unlearn(sim.model, sim.clients, ForgetRequest(classes=[3]), rounds=2, max_steps=3)
    assert 0 < result.mask.fraction < 0.3
    assert frozen_elements_equal(result.model, before, result.mask)
    for name, buf in result.model.named_buffers():  # BatchNorm statistics of unselected channels untouched
        selected = result.mask.masks.get(name.rsplit(".", 1)[0] + ".weight")
        if selected is None or buf.dim() == 0:
            assert torch.equal(buf, before[name]), name
        else:
            assert torch.equal(buf[~selected], before[name][~selected]), name
    assert any(not torch.equal(p, before[n]) for n, p in result.model.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in sim.model.state_dict().items())  # input not modified


# -- each request kind end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("request_", [ForgetRequest(classes=[3]), ForgetRequest(clients=[1]),
                                      ForgetRequest(sample_ids=list(range(0, 1300, 13)))], ids=lambda r: r.kind)
def test_each_request_kind_end_to_end(sim, request_, tmp_path):
    plan = sim.request(request_)
    original = sim.evaluate(sim.model)
    retrained = B.federated_retrain(sim.model, sim.clients, plan, rounds=2, progress=False)
    retrained_metrics = sim.evaluate(retrained.model)
    grid = recording(sim.clients)
    result = federated_unlearn(sim.model, sim.clients, request_, rounds=1, max_steps=4)
    record = sim.report(result, original, retrained, retrained_metrics)
    path = write_json(record, tmp_path / "run.json")
    loaded = json.loads(path.read_text())
    assert loaded["request"]["kind"] == request_.kind and loaded["method"] == "selective" and loaded["seed"] == 0
    for which in ("original", "unlearned", "retrained"):
        for key in ("forget_acc", "remaining_acc", "test_acc"):
            assert 0.0 <= loaded["metrics"][which][key] <= 1.0
    assert 0 < loaded["mask"]["fraction"] < 1
    assert set(loaded["timings_s"]) >= {"scoring", "unlearning", "retrain"}
    assert 0 < loaded["bytes"]["unlearning_round"] < 0.25 * loaded["bytes"]["fedavg_round"]
    senders = {(cid, op) for d, cid, op, _ in exchanges(grid) if d == "up"}
    scorers = {cid for cid, op in senders if op == "query.score"}
    assert scorers == set(plan.forgetting_clients)
    if request_.kind == "client":  # the leaving client scores, then sends nothing
        assert (1, "train.unlearn") not in senders and 1 in scorers
    if request_.kind == "class":
        assert loaded["metrics"]["original"]["forget_acc"] > 0.5
        assert loaded["metrics"]["unlearned"]["forget_acc"] < loaded["metrics"]["original"]["forget_acc"]


def test_baselines_run_on_the_same_request(sim):
    plan = sim.request(ForgetRequest(classes=[3]))
    layers = sim.layers()
    common = dict(rounds=1, max_steps=3)
    ours = federated_unlearn(sim.model, sim.clients, plan.request, ratio=0.1, **common)
    random = B.federated_random_channels(sim.model, sim.clients, plan, layers, ratio=0.1, **common)
    assert random.mask.fraction == pytest.approx(ours.mask.fraction, rel=0.2)
    assert random.mask.sha256() != ours.mask.sha256()
    finetune = B.federated_finetune(sim.model, sim.clients, plan, layers, **common)
    # ours: round 0 carries the reset selected values down and the repaired ones up (~11% of the model each way)
    assert finetune.mask.fraction == 1.0 and finetune.bytes["unlearning_round"] > 3 * ours.bytes["unlearning_round"]
    cdp = B.federated_cdp(sim.model, sim.clients, plan, layers, ratio=0.1, **common)
    for name, idx in cdp.extra["pruned_channels"].items():  # pruned channels stay exactly zero
        assert (cdp.model.get_parameter(f"{name}.weight")[idx] == 0).all()
    eraser = B.federated_eraser(sim.model, sim.clients, plan, sim.training.store, local_steps=10)
    assert eraser.extra["storage_bytes"] > 0 and eraser.extra["stored_rounds"] == 3  # rounds 0, 2, 4
    for r in (ours, random, finetune, cdp, eraser):
        m = sim.evaluate(r.model)
        assert 0 <= m["forget_acc"] <= 1 and r.timings_s["unlearning"] > 0


# -- FedAvg: Lightning callbacks, overhead, resume, bad input -------------------------------------------
class _CountFits(Callback):
    def __init__(self):
        self.fits = 0

    def on_train_start(self, trainer, pl_module):
        self.fits += 1


def test_fedavg_uses_lightning_callbacks_measures_overhead_and_resumes(digits, tmp_path):
    fdm = FederatedDataModule(*digits, num_clients=3, seed=0, batch_size=32)
    counter = _CountFits()
    model = _model()
    clients = make_clients(fdm, model, callbacks=[counter], trainer_kwargs={"max_steps": 3})
    straight = run_fedavg(model, clients, rounds=3, fraction=2 / 3, progress=False)
    assert counter.fits == 3 * 2  # 2 of 3 clients sampled per round, each a Lightning fit
    row = straight.history[-1]
    assert row["local_compute_s"] > 0 and row["overhead_s"] >= 0 and row["bytes_up"] > 0
    assert np.isfinite(straight.overhead_fraction)

    model2 = _model()
    clients2 = make_clients(fdm, model2, trainer_kwargs={"max_steps": 3})
    run_fedavg(model2, clients2, rounds=2, fraction=2 / 3, checkpoint=ServerCheckpoint(tmp_path), progress=False)
    resumed = run_fedavg(_model(), clients2, rounds=3, fraction=2 / 3, checkpoint=ServerCheckpoint.open(tmp_path, {}),
                         progress=False)
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    assert [r["clients"] for r in resumed.history] == [r["clients"] for r in straight.history]
    for k, v in get_arrays(straight.model).items():  # same seed, same result, interrupted or not
        assert torch.allclose(v, get_arrays(resumed.model)[k], atol=1e-6), k


def test_rounds_must_be_positive(sim, digits):
    with pytest.raises(ValueError, match=r"rounds must be an integer >= 1, got 0"):
        run_fedavg(_model(), sim.clients, rounds=0)
    with pytest.raises(ValueError, match=r"rounds must be an integer >= 1 or 'auto', got -2"):
        federated_unlearn(sim.model, sim.clients, ForgetRequest(classes=[3]), rounds=-2)
    with pytest.raises(ValueError, match=r"rounds must be an integer >= 1"):
        FederatedSimulation(sim.fdm, _model(), rounds=0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        run_fedavg(_model(), sim.clients, rounds=1, fraction=1.5)


def test_unlearning_needs_forget_data_and_a_deployed_model(sim):
    fresh = make_clients(sim.fdm, _model())
    with pytest.raises(RuntimeError, match="holds no global model yet"):
        federated_unlearn(sim.model, fresh, ForgetRequest(classes=[3]))
    nobody = ForgetRequest(sample_ids=[len(sim.fdm.targets) + 5])  # an id no client holds
    with pytest.raises(ValueError, match="no client holds data to forget"):
        federated_unlearn(sim.model, sim.clients, nobody)


# -- learning rates of the masked rounds -------------------------------------------------------------------
def test_scale_learning_rate_gives_named_parameters_their_own_group():
    from lightning_unlearn.callbacks.learning_rate import ScaleLearningRate
    from lightning_unlearn.repair import LearningRateGroups
    from lightning_unlearn.config import UnlearnConfig
    from lightning_unlearn.federated.protocol import HEAD_LR_SCALE, unlearn_config

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    LearningRateGroups(2.0, {"fc2.weight": 10.0, "fc2.bias": 10.0}).apply(model, [opt])
    by_id = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_id[id(params["fc2.weight"])] == pytest.approx(1e-2) and by_id[id(params["fc2.bias"])] == pytest.approx(1e-2)
    assert all(by_id[id(p)] == pytest.approx(2e-3) for n, p in params.items() if not n.startswith("fc2."))
    assert sorted(by_id) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    with pytest.raises(ValueError, match="lr_scale"):
        ScaleLearningRate(1.0, {"fc2.weight": 0.0})
    request = ForgetRequest(classes=[3])
    resolved = UnlearnConfig(max_steps=5).resolved(request, "federated")
    assert resolved.objective == "retain" and resolved.head_rows == [3]
    assert unlearn_config(resolved)["head_lr_scale"] == HEAD_LR_SCALE == 10.0
    assert "head_lr_scale" not in unlearn_config(UnlearnConfig(head_lr_scale=None).resolved(request, "federated"))
    assert UnlearnConfig().resolved(request, "central").head_lr_scale is None  # central: no head rate of its own
    with pytest.raises(ValueError, match="needs a resolved UnlearnConfig"):
        unlearn_config(UnlearnConfig())
