"""Remove, then repair, in the federated engine: the server resets the selected slices, one statistics round
re-estimates the selected BatchNorm channels from the clients' retain data, the masked rounds repair."""
from __future__ import annotations

import copy
from dataclasses import replace
import functools

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedPartitions, FederatedSimulation, federated_unlearn
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.federated.server import masked_aggregate
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.mask.arrays import selected_values
from lightning_unlearn.federated import messages as records
from lightning_unlearn.federated.messages import COUNT_BYTES, INDEX_BYTES, Reply, down, tensor_bytes
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.protocol import STATS_BATCHES, round_config, select, unlearn_config
from lightning_unlearn.federated.server import pool_batchnorm_moments
from lightning_unlearn.reset import selected_batchnorm_channels
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.mask import BN_TYPES
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.privacy.models import DPSmallCNN
from lightning_unlearn.reset import reset_selected
from lightning_unlearn.mask import ParameterMask, select_channels

from federated_log import exchanges, recording

TINY = dict(channels=(8, 16), hidden=32, lr=3e-3)
REQUEST = ForgetRequest(classes=[3])
UNLEARN = dict(rounds=2, max_steps=3, ratio=0.2, seed=0, calibrate="none", early_stopping=False)  # the masked
# protocol alone, exactly ``rounds`` rounds (the head calibration after it: test_federated_calibration.py; the
# stopping rule: test_federated_recovery.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def _federation(digits, model_cls=SmallCNN) -> FederatedSimulation:
    """3 IID clients, 3 short FedAvg rounds, the class-3 request delivered (clients hold the deployed model)."""
    fdm = FederatedDataModule(*digits, num_clients=3, partition="iid", seed=0, batch_size=32)
    torch.manual_seed(0)
    sim = FederatedSimulation(fdm, model_cls(**TINY), rounds=3, trainer_kwargs={"max_steps": 10}, progress=False)
    sim.train()
    sim.request(REQUEST)
    return sim


@pytest.fixture(scope="module")
def sim(digits, one_thread):
    return _federation(digits)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_selection(model, mask) -> dict[str, torch.Tensor]:
    """BatchNorm name -> selected channels, read from the mask independently of the library helper."""
    return {n: mask.masks[f"{n}.weight"] for n, m in model.named_modules() if isinstance(m, BN_TYPES)}


# -- the reset reaches the model; everything else stays bit-exact ------------------------------------------------
def test_reinit_replaces_the_selected_slices_and_keeps_every_other_element_bit_exact(sim):
    original = _state(sim.model)
    grid = recording(sim.clients)
    result = federated_unlearn(sim.model, sim.clients, REQUEST, reset="reinit", **UNLEARN)
    log, booked = exchanges(grid), result.traffic.payload
    after, mask = _state(result.model), result.mask
    assert result.config.reset == "reinit" and _state(sim.model).keys() == original.keys()
    for name, m in mask.masks.items():  # parameters: selected slices replaced, the rest untouched
        assert torch.equal(after[name][~m], original[name][~m]), name
        if m.any():
            assert (after[name][m] != original[name][m]).float().mean() > 0.9, name
    selection = _bn_selection(result.model, mask)
    assert all(sel.any() and not sel.all() for sel in selection.values())  # both BatchNorms partly selected
    for bn, sel in selection.items():  # running statistics: re-estimated where selected, bit-exact elsewhere
        for stat in ("running_mean", "running_var"):
            key = f"{bn}.{stat}"
            assert torch.equal(after[key][~sel], original[key][~sel]), key
            assert (after[key][sel] != original[key][sel]).all(), key
        assert torch.equal(after[f"{bn}.num_batches_tracked"], original[f"{bn}.num_batches_tracked"])
    assert all(torch.equal(v, original[k]) for k, v in _state(sim.model).items())  # the deployed model is untouched

    # reproducible: the same seed gives the same mask and the same weights, bit for bit
    again = federated_unlearn(sim.model, sim.clients, REQUEST, reset="reinit", **UNLEARN)
    assert again.mask.sha256() == mask.sha256()
    assert all(torch.equal(v, after[k]) for k, v in _state(again.model).items())

    # bytes: the statistics round is booked; every masked round carries exactly the selected values, the
    # selected channels' two statistics (round 0 also the channel indices), never more
    selected_channels = sum(int(s.sum()) for s in selection.values())
    assert result.bytes["statistics"] == booked["bn_stats"].total > 0
    assert result.bytes["total"] == (result.bytes["scoring"] + result.bytes["statistics"]
                                     + sum(booked[f"unlearn/{r}"].total for r in range(2)))
    values = 4 * mask.num_selected + 4 * 2 * selected_channels
    indices = INDEX_BYTES * sum(len(v) for v in mask.channels.values())
    downs = [(op, m.nbytes) for d, _, op, m in log if d == "down" and op == "train.unlearn"]
    assert downs == [("train.unlearn", values + indices)] * 3 + [("train.unlearn", values)] * 3
    model_bytes = 4 * sum(v.numel() for v in get_arrays(sim.model).values())
    assert values <= (mask.fraction + 0.01) * model_bytes < 0.3 * model_bytes  # the selected fraction, not the model
    # the statistics replies are per-channel moments only: (3, k) float64 per selected BatchNorm
    ups = [m for d, _, op, m in log if d == "up" and op == "query.bn_stats"]
    assert len(ups) == 3 and all(m.kind == "bn_stats" for m in ups)
    assert all({k: tuple(v.shape) for k, v in m.tensors.items()} == {bn: (3, int(s.sum())) for bn, s in selection.items()}
               for m in ups)


def test_random_channels_baseline_resets_the_same_way(sim):
    layers = sim.layers()
    original = _state(sim.model)
    plan = sim.request(REQUEST)
    result = B.federated_random_channels(sim.model, sim.clients, plan, layers, reset="reinit", **UNLEARN)
    after = _state(result.model)
    assert result.bytes["statistics"] > 0 and result.config.reset == "reinit"
    for name, m in result.mask.masks.items():
        assert torch.equal(after[name][~m], original[name][~m]), name
    for bn, sel in _bn_selection(result.model, result.mask).items():
        assert torch.equal(after[f"{bn}.running_var"][~sel], original[f"{bn}.running_var"][~sel])
        assert (after[f"{bn}.running_var"][sel] != original[f"{bn}.running_var"][sel]).all()


# -- the pooled statistics are those of the union of the clients' retain data ------------------------------------
def test_pooled_batchnorm_statistics_equal_the_central_estimate_on_the_union(sim):
    """Only conv2/bn2 selected, so the estimate does not depend on how the data is batched: the server's
    pooled statistics must equal the mean and variance of bn2's input over all retain data in one batch."""
    original = copy.deepcopy(sim.model)
    result = federated_unlearn(sim.model, sim.clients, REQUEST, reset="reinit", layers=["conv2"], head_rows=None,
                              **UNLEARN)
    sel = result.mask.masks["bn2.weight"]
    assert sel.any() and not result.mask.masks["bn1.weight"].any()
    retain = [Subset(c.dataset, split.retain.tolist()) for c, split in zip(sim.clients, sim.plan.splits)]
    assert all(len(r) <= STATS_BATCHES * sim.fdm.batch_size for r in retain)  # every sample counted

    central = copy.deepcopy(original).eval()
    reset_selected(central, result.mask, "reinit", 0)
    captured = []
    hook = central.bn2.register_forward_hook(lambda m, args, out: captured.append(args[0][:, sel]))
    x = torch.cat([b[0] for b in DataLoader(ConcatDataset(retain), batch_size=len(ConcatDataset(retain)))])
    with torch.no_grad():
        central(x)
    hook.remove()
    values = captured[0].transpose(0, 1).reshape(int(sel.sum()), -1).double()
    assert values.shape[1] == x.shape[0] * captured[0].shape[2] * captured[0].shape[3]
    torch.testing.assert_close(result.model.bn2.running_mean[sel].double(), values.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.model.bn2.running_var[sel].double(), values.var(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(result.model.bn1.running_mean, original.bn1.running_mean)  # bn1 not selected: untouched


def test_no_statistics_round_without_batchnorm_channels(digits):
    """GroupNorm keeps no running statistics: the reset still travels with round 0, no statistics round runs."""
    sim = _federation(digits, DPSmallCNN)
    original = _state(sim.model)
    result = federated_unlearn(sim.model, sim.clients, REQUEST, reset="reinit", **UNLEARN)
    assert "bn_stats" not in result.traffic.payload and "statistics" not in result.bytes
    assert selected_batchnorm_channels(result.model, result.mask) == {}
    after = _state(result.model)
    for name, m in result.mask.masks.items():
        assert torch.equal(after[name][~m], original[name][~m]), name
        if m.any():
            assert not torch.equal(after[name][m], original[name][m]), name
    assert result.traffic.payload["unlearn/0"].down == 3 * (4 * result.mask.num_selected + INDEX_BYTES * sum(
        len(v) for v in result.mask.channels.values()))


# -- reset="none" is today's protocol, bit for bit -------------------------------------------------------------
def test_reset_none_is_the_plain_masked_protocol_bit_for_bit(sim):
    """The masked rounds as they ran before the reset existed (round 0: only the mask; later rounds: the selected
    values), written out here, give the same mask, the same bytes and the same weights."""
    ours = federated_unlearn(sim.model, sim.clients, REQUEST, reset="none", **UNLEARN)
    assert "bn_stats" not in ours.traffic.payload and "statistics" not in ours.bytes and "reset" not in ours.timings_s

    cfg = UnlearnConfig.build(reset="none", **{k: v for k, v in UNLEARN.items() if k != "rounds"}).resolved(
        REQUEST, "federated")
    work = copy.deepcopy(sim.model)
    plain = Federation(sim.clients.grid, len(sim.clients))
    plain.request = REQUEST
    scores, _ = select(plain, work, cfg)
    mask = select_channels(scores, work, cfg.ratio, cfg.scope, cfg.threshold, cfg.include_head, cfg.head_rows)
    assert mask.sha256() == ours.mask.sha256()
    reference = get_arrays(work)
    current = reference
    for r in range(UNLEARN["rounds"]):
        content = down({} if r == 0 else selected_values(current, mask), round_config(unlearn_config(cfg), r),
                       mask.channels if r == 0 else None)
        current = masked_aggregate(reference, mask, plain.ask(content, "train.unlearn", f"unlearn/{r}"))
    assert all(torch.equal(current[k], v) for k, v in get_arrays(ours.model).items())
    rounds = lambda book: [(b.down, b.up) for k, b in book.items() if k.startswith("unlearn/")]  # noqa: E731
    assert rounds(plain.traffic.payload) == rounds(ours.traffic.payload)


# -- the statistics reply keeps its contract ---------------------------------------------------------------------
def _moments(k1: int = 2, k2: int = 3, n: float = 640.0) -> dict[str, torch.Tensor]:
    def one(k):
        x = torch.randn(k, int(n), dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        return torch.stack([torch.full((k,), n, dtype=torch.float64), x.sum(1), x.square().sum(1)])
    return {"bn1": one(k1), "bn2": one(k2)}


def _contract() -> dict[str, torch.Tensor]:
    return {"bn1": torch.tensor([True, False, True]), "bn2": torch.tensor([True, True, False, True])}


def _with(name: str, change) -> Reply:
    moments = _moments()
    moments[name] = change(moments[name].clone())
    return Reply("bn_stats", moments, 10)


def _set(t: torch.Tensor, index, value) -> torch.Tensor:
    t[index] = value
    return t


@pytest.mark.parametrize("message, error", [
    (Reply("bn_stats", {"bn1": _moments()["bn1"]}, 10), r"client 2: a 'bn_stats' reply is missing key 'bn2'"),
    (Reply("bn_stats", {**_moments(), "fc1": _moments()["bn1"]}, 10),
     r"client 2: a 'bn_stats' reply has unexpected key 'fc1' \(expected the 2 selected BatchNorm layers\)"),
    (_with("bn2", lambda t: t[:, :2]), r"client 2: a 'bn_stats' reply 'bn2' has shape \(3, 2\), expected \(3, 3\)"),
    (_with("bn1", lambda t: t.float()), r"client 2: a 'bn_stats' reply 'bn1' has dtype torch.float32"),
    (_with("bn1", lambda t: _set(t, (1, 0), float("nan"))), r"client 2: a 'bn_stats' reply 'bn1' holds non-finite"),
    (_with("bn1", lambda t: _set(t, (0, 1), 7.0)), r"client 2: a 'bn_stats' reply 'bn1' count row must be one whole"),
    (_with("bn2", lambda t: _set(t, 0, 2.5)), r"client 2: a 'bn_stats' reply 'bn2' count row must be one whole"),
    (_with("bn2", lambda t: t.zero_()), r"client 2: a 'bn_stats' reply 'bn2' counts 0 values from 10 samples"),
    (_with("bn1", lambda t: _set(t, 2, 0.0)), r"client 2: a 'bn_stats' reply 'bn1' sums of squares are below"),
    (_with("bn2", lambda t: _set(t, 0, 0.0)), r"client 2: a 'bn_stats' reply 'bn2' sums of squares are below"),
    (Reply("bn_stats", {"bn1": torch.zeros(3, 2, dtype=torch.float64),  # no samples, yet squares that would
                        "bn2": _set(torch.zeros(3, 3, dtype=torch.float64), 2, 1e6)}, 0),  # inflate the variance
     r"client 2: a 'bn_stats' reply 'bn2' sums of squares are below sum\^2 / count \(or not 0 for no values\)"),
    (Reply("bn_stats", _moments(), 10, {"pixels": 1.0}), r"client 2: a 'bn_stats' reply has unexpected metric"),
])
def test_malformed_statistics_replies_are_refused_naming_client_and_key(message, error):
    good = Reply("bn_stats", _moments(), 10, {"local_compute_s": 0.1})
    pooled = pool_batchnorm_moments([good, good], _contract())  # two equal halves: the same estimate
    x = torch.randn(2, 640, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pooled["bn1"][0], x.mean(1))
    torch.testing.assert_close(pooled["bn1"][1], torch.cat([x, x], 1).var(1))
    if message.metrics:  # metrics are checked where the server reads a reply
        with pytest.raises(ValueError, match=error) as info:
            records.read_reply(records.up("bn_stats", message.tensors, 10, message.metrics), 2)
    else:
        with pytest.raises(ValueError, match=error) as info:
            pool_batchnorm_moments([replace(good, client=0), replace(message, client=2)], _contract())
    assert "\n" not in str(info.value)


def test_statistics_reply_keeps_its_shape_and_travels_as_a_flower_record():
    with pytest.raises(ValueError, match=r"client 0: a 'bn_stats' reply 'bn1' has shape \(2, 4\), expected \(3, 2\)"):
        pool_batchnorm_moments([Reply("bn_stats", {**_moments(), "bn1": torch.zeros(2, 4, dtype=torch.float64)}, 1,
                                      client=0)], _contract())
    with pytest.raises(TypeError, match=r"client 4: the server expects a 'masked_update' reply here, got "
                                        "a 'bn_stats' reply"):
        masked_aggregate({}, ParameterMask({}), [Reply("bn_stats", _moments(), 10, client=4)])

    moments = _moments()
    content = records.up("bn_stats", moments, 10, {"local_compute_s": 0.5})
    back = records.read_reply(content)
    assert back.kind == "bn_stats" and back.num_samples == 10 and back.metrics == {"local_compute_s": 0.5}
    assert all(torch.equal(back.tensors[k], v) for k, v in moments.items())
    assert records.payload_bytes(content) == tensor_bytes(moments) + COUNT_BYTES
    content["extra"] = content["arrays"]
    with pytest.raises(ValueError, match=r"a 'bn_stats' reply has unexpected key 'extra'"):
        records.read_reply(content)


# -- Flower: the same reset, the same statistics, the same weights --------------------------------------------------
@pytest.mark.slow
def test_flower_simulation_with_reset_matches_in_process(digits):
    pytest.importorskip("ray", reason="Flower's simulation engine needs ray (the flower extra)")
    from flower_support.simulation import simulate
    from lightning_unlearn.federated.flower import UnlearnPlan

    model_fn = functools.partial(SmallCNN, **TINY)
    parts = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)
    sim = _federation(digits)  # the same federation as parts (digits, 3 IID clients, seed 0, batch 32)
    ours = federated_unlearn(sim.model, sim.clients, REQUEST, reset="reinit", **UNLEARN)
    flower = simulate(model_fn, parts, 3, None, UnlearnPlan(REQUEST, reset="reinit", evaluate=False, **UNLEARN),
                      initial_model=sim.model, trainer_kwargs={"max_steps": 10})
    assert flower.mask.sha256() == ours.mask.sha256()
    for k, v in get_arrays(ours.model).items():
        torch.testing.assert_close(flower.arrays[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for prefix in ("bn_stats", "unlearn/"):  # the same payload bytes in both engines, statistics round included
        mine = [(b.down, b.up) for k, b in flower.traffic.payload.items() if k.startswith(prefix)]
        assert mine and mine == [(b.down, b.up) for k, b in ours.traffic.payload.items() if k.startswith(prefix)], prefix
