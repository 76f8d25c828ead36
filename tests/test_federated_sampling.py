"""Client sampling in the federated unlearning rounds (issue 16, item 3): each masked round calls only a seeded
``fraction`` of the clients, a client gets the mask with its first call, frozen elements stay bit-exact, and
``fraction=1.0`` is the protocol as it was before sampling, bit for bit."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_unlearn import ForgetRequest
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.federated.server import masked_aggregate
from lightning_unlearn.mask.arrays import selected_values
from lightning_unlearn.federated.protocol import (
    masked_down, masked_rounds, remove, round_config, select, unlearn_config,
)
from lightning_unlearn.federated.server import sample_clients
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.mask import select_channels

from federated_log import down_message, recording

TINY = dict(channels=(8, 16), hidden=32, lr=3e-3)
REQUEST = ForgetRequest(classes=[3])
UNLEARN = dict(max_steps=1, ratio=0.2, seed=0, calibrate="none", early_stopping=False)  # the masked rounds alone,
# exactly ``rounds`` of them (the calibration: test_federated_calibration.py; the stopping rule:
# test_federated_recovery.py)
CLIENTS, FRACTION = 20, 0.25

pytestmark = pytest.mark.usefixtures("one_thread")


def _calls(grid) -> list[tuple[str, int, str, object]]:
    """(round label, client id, message type, broadcast) of every server -> client message, in order."""
    return [(m.metadata.group_id, cid, op, down_message(m.content)) for cid, op, m, _ in grid.log]


def _reached(calls, label: str, operation: str) -> list[int]:
    return [cid for lab, cid, op, _ in calls if lab == label and op == operation]


def _federation(digits, num_clients: int, request: ForgetRequest) -> FederatedSimulation:
    """IID clients, one short sampled FedAvg round (deploys the model to every client), the request delivered."""
    fdm = FederatedDataModule(*digits, num_clients=num_clients, partition="iid", seed=0, batch_size=32)
    torch.manual_seed(0)
    sim = FederatedSimulation(fdm, SmallCNN(**TINY), rounds=1, fraction=FRACTION, trainer_kwargs={"max_steps": 2},
                              progress=False)
    sim.train()
    sim.request(request)
    return sim


@pytest.fixture(scope="module")
def sim(digits, one_thread):
    return _federation(digits, CLIENTS, REQUEST)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reset", ["none", "reinit"])
def test_each_masked_round_reaches_exactly_the_sampled_clients_and_new_ones_get_the_mask(sim, reset):
    grid = recording(sim.clients)
    rounds = 3
    result = federated_unlearn(sim.model, sim.clients, REQUEST, rounds=rounds, fraction=FRACTION, reset=reset,
                               **UNLEARN)
    calls_all = _calls(grid)
    mask_channels = {k: tuple(v) for k, v in result.mask.channels.items()}
    selected = {k for k, m in result.mask.masks.items() if m.any()}
    # scoring (and the statistics round after a reset) still ask every client
    assert sorted(_reached(calls_all, "score", "query.score")) == list(range(CLIENTS))
    assert sorted(_reached(calls_all, "bn_stats", "query.bn_stats")) == (list(range(CLIENTS)) if reset != "none" else [])

    seen: set[int] = set()
    late_joiners = 0
    for r, row in enumerate(result.history):
        expected = [int(i) for i in sample_clients(range(CLIENTS), FRACTION, 0, r)]
        called = _reached(calls_all, f"unlearn/{r}", "train.unlearn")
        assert len(expected) == 5 and called == expected and row["sampled"] == expected
        assert row["clients"] == 5  # IID: every sampled client holds retain data and replies
        calls = [(cid, msg) for lab, cid, op, msg in calls_all if lab == f"unlearn/{r}"]
        assert row["bytes_down"] == sum(msg.nbytes for _, msg in calls)
        values_sent = None
        for cid, msg in calls:
            if cid in seen:  # the mask travels once per client
                assert msg.channels is None, (r, cid)
            else:
                assert msg.channels == mask_channels, (r, cid)
                late_joiners += r > 0
            if r == 0 and reset == "none":  # everyone holds the deployed model: no values in round 0
                assert dict(msg.arrays) == {}
            else:  # the current selected slices (and, after a reset, the selected BatchNorm statistics)
                assert selected <= set(msg.arrays)
                assert any(k.endswith("running_mean") for k in msg.arrays) == (reset != "none")
                if values_sent is None:
                    values_sent = msg.arrays
                assert all(torch.equal(v, values_sent[k]) for k, v in msg.arrays.items())  # same values to all
        seen.update(called)
    assert late_joiners > 0  # some clients were first sampled in a later round and got the mask then
    assert len({tuple(row["sampled"]) for row in result.history}) == rounds  # a new draw every round
    assert result.extra["fraction"] == FRACTION


@pytest.mark.parametrize("reset", ["none", "reinit"])
def test_frozen_elements_stay_bit_exact_and_sampling_changes_only_the_selected_slices(sim, reset):
    original = _state(sim.model)
    sampled = federated_unlearn(sim.model, sim.clients, REQUEST, rounds=2, fraction=FRACTION, reset=reset, **UNLEARN)
    full = federated_unlearn(sim.model, sim.clients, REQUEST, rounds=2, fraction=1.0, reset=reset, **UNLEARN)
    assert sampled.mask.sha256() == full.mask.sha256()  # the scoring round asks every client either way
    a, b, mask = _state(sampled.model), _state(full.model), sampled.mask.masks
    assert a.keys() == b.keys() == original.keys()
    for name, m in mask.items():
        assert torch.equal(a[name][~m], original[name][~m]) and torch.equal(b[name][~m], original[name][~m]), name
    differ = [name for name, m in mask.items() if m.any() and not torch.equal(a[name][m], b[name][m])]
    assert differ  # fewer clients per round: other selected values
    for key in a.keys() - mask.keys():  # buffers: BatchNorm statistics from the all-client statistics round
        assert torch.equal(a[key], b[key]), key
        if reset == "none":
            assert torch.equal(a[key], original[key]), key
    assert all(torch.equal(v, original[k]) for k, v in _state(sim.model).items())  # the deployed model is untouched
    # fewer clients, fewer bytes per masked round
    assert sampled.bytes["unlearning_round"] < full.bytes["unlearning_round"] / 2
    assert sampled.bytes["scoring"] == full.bytes["scoring"]


def _protocol_before_sampling(model, fed: Federation, rounds: int, reset: str):
    """The masked rounds as they were before client sampling: every client every round, the mask in round 0."""
    cfg = UnlearnConfig.build(None, reset=reset, **UNLEARN).resolved(REQUEST, "federated")
    work = copy.deepcopy(model)
    fed.request = REQUEST
    scores, _ = select(fed, work, cfg)
    mask = select_channels(scores, work, cfg.ratio, cfg.scope, cfg.threshold, cfg.include_head, cfg.head_rows)
    statistics = remove(fed, work, mask, cfg)
    reference = get_arrays(work)
    current = reference
    for r in range(rounds):
        content = masked_down(current, mask, round_config(unlearn_config(cfg), r), statistics, r > 0, r == 0)
        replies = fed.ask(content, "train.unlearn", f"unlearn/{r}")
        current = masked_aggregate(reference, mask, replies)
    return mask, current


@pytest.mark.parametrize("reset", ["none", "reinit"])
def test_fraction_one_is_bit_identical_to_the_protocol_before_sampling(sim, reset):
    before = Federation(sim.clients.grid, CLIENTS)
    mask, arrays = _protocol_before_sampling(sim.model, before, 2, reset)
    after = federated_unlearn(sim.model, sim.clients, REQUEST, rounds=2, fraction=1.0, reset=reset, **UNLEARN)
    default = federated_unlearn(sim.model, sim.clients, REQUEST, rounds=2, reset=reset, **UNLEARN)
    for result in (after, default):
        assert result.mask.sha256() == mask.sha256()
        state = get_arrays(result.model)
        assert state.keys() == arrays.keys() and all(torch.equal(state[k], arrays[k]) for k in arrays)
        assert all(row["clients"] == CLIENTS and "sampled" not in row for row in result.history)
    per_round = lambda t: {k: (v.down, v.up) for k, v in t.payload.items() if k != "hello"}  # noqa: E731
    assert per_round(after.traffic) == per_round(before.traffic) == per_round(default.traffic)


@pytest.mark.parametrize("bad", [0, 0.0, -0.25, 1.5, math.nan, True, "0.5", None])
def test_bad_fraction_fails_in_one_line_before_any_work(sim, bad):
    grid = recording(sim.clients)
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\], got .+$") as err:
        federated_unlearn(sim.model, sim.clients, REQUEST, fraction=bad, **UNLEARN)
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)
    assert grid.log == []  # no client was asked anything
    fed = Federation(sim.clients.grid, CLIENTS)
    fed.request = REQUEST
    mask = select_channels(select(fed, sim.model, UnlearnConfig().resolved(REQUEST, "federated"))[0], sim.model, 0.2)
    grid.log.clear()
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\]"):
        masked_rounds(fed, get_arrays(sim.model), mask, 1, {"seed": 0}, fraction=bad)
    assert grid.log == []


def test_a_sampled_round_without_retain_data_keeps_the_selected_values(digits):
    """4 clients, 1 sampled per round; clients 0-2 leave, so only client 3 has retain data to repair with."""
    leaving = ForgetRequest(clients=[0, 1, 2])
    sim = _federation(digits, 4, leaving)
    assert [int(sample_clients(range(4), FRACTION, 0, r)[0]) for r in range(2)] == [3, 1]  # the draws used below
    one = federated_unlearn(sim.model, sim.clients, leaving, rounds=1, fraction=FRACTION, **UNLEARN)
    with pytest.warns(UserWarning, match=r"masked round 1: none of the sampled clients \[1\] has retain data"):
        two = federated_unlearn(sim.model, sim.clients, leaving, rounds=2, fraction=FRACTION, **UNLEARN)
    assert [row["clients"] for row in two.history] == [1, 0]
    a, b = get_arrays(one.model), get_arrays(two.model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # round 1 left the selected values as round 0 made them
    assert selected_values(a, one.mask).keys()  # and round 0 did train (something was selected)

    only_client_0 = ForgetRequest(clients=[1, 2, 3])  # client 0 is never drawn in rounds 0-1
    sim.request(only_client_0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no sampled client had retain data in any of the 2"):
        federated_unlearn(sim.model, sim.clients, only_client_0, rounds=2, fraction=FRACTION, **UNLEARN)


def test_the_cli_fraction_also_samples_the_unlearning_rounds(one_thread):
    """``federated.fraction`` reaches the masked rounds through the CLI's federated engine, and the report records it."""
    from lightning_unlearn.commands import FederatedEngine
    from lightning_unlearn.data.presets import FederatedDigitsData
    from lightning_unlearn.federated.runner import FederatedSettings

    fdm = FederatedDigitsData(num_clients=8, forget_classes=[3], batch_size=64)
    torch.manual_seed(0)
    model = SmallCNN(**TINY)
    engine = FederatedEngine(FederatedSettings(rounds=1, fraction=FRACTION, unlearn_rounds=2), seed=0)
    result = engine.unlearn(model, fdm, UnlearnConfig(ratio=0.2, max_steps=1, seed=5, early_stopping=False))
    assert result.extra["fraction"] == FRACTION
    assert [row["sampled"] for row in result.history] == [
        [int(i) for i in sample_clients(range(8), FRACTION, 5, r)] for r in range(2)]  # the config's seed
    assert engine.describe(model, result)["federated"]["fraction"] == FRACTION
