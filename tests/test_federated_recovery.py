"""The federated repair's stopping rule: masked rounds until the clients' retain accuracy is back, at most a cap."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedPartitions, FederatedSimulation, federated_unlearn, make_client_app
from lightning_unlearn.federated import run_fedavg
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.flower import FedAvgPlan, UnlearnPlan
from lightning_unlearn.federated.flower.server_app import run_server
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.models import SmallCNN

from federated_log import exchanges, recording
from flower_support.faults import NODE_DIED, die_at

MODEL_FN = functools.partial(SmallCNN, channels=(8, 16), hidden=32, lr=3e-3)
PARTS = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)
FEDAVG = FedAvgPlan(rounds=4, local_config={"max_steps": 15})
# 30% of the channels dampened, three local steps per round: the retain accuracy needs several rounds to come back
SLOW = dict(reset="dampen", ratio=0.3, max_steps=3, stop_tolerance=0.02)
LEAVE = ForgetRequest(clients=[1])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sim(digits, one_thread):
    torch.manual_seed(0)
    fdm = FederatedDataModule(*digits, num_clients=3, partition="iid", seed=0, batch_size=32)
    s = FederatedSimulation(fdm, MODEL_FN(), rounds=4, trainer_kwargs={"max_steps": 15}, progress=False)
    s.train()
    return s


def _first_recovered(result) -> int:
    """1 + the first round whose check is within the tolerance of the deployed model's retain accuracy."""
    reference, tolerance = result.extra["deployed"]["retain_acc"], result.config.stop_tolerance
    return 1 + next(i for i, c in enumerate(result.extra["checks"]) if c["remaining_acc"] >= reference - tolerance)


def test_repair_stops_as_soon_as_the_retain_accuracy_is_back(sim):
    trained = {k: v.clone() for k, v in sim.model.state_dict().items()}
    slow = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=10, **SLOW)
    assert slow.extra["stop_reason"] == "recovered" and slow.extra["round_cap"] == 10
    rounds = len(slow.history)
    assert slow.extra["rounds"] == rounds
    assert rounds == _first_recovered(slow)  # stopped at the first check within the tolerance, not later
    assert 1 < rounds < 10  # several rounds were needed, and the cap was not what stopped it
    assert [r["round"] for r in slow.history] == list(range(slow.extra["rounds"]))
    assert [r["retain_acc"] for r in slow.history] == [c["remaining_acc"] for c in slow.extra["checks"]]
    assert frozen_elements_equal(slow.model, trained, slow.mask)  # several aggregations, frozen elements exact
    # a small removal comes back in the first round
    fast = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=10, reset="dampen", ratio=0.1, max_steps=10)
    assert fast.extra["rounds"] == 1 and fast.extra["stop_reason"] == "recovered" and len(fast.extra["checks"]) == 1
    # ``patience`` checks without a new best retain accuracy stop a repair that is not coming back
    stuck = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=10, reset="dampen", ratio=0.5, max_steps=2,
                              stop_tolerance=0.0, patience=1)
    accs = [c["remaining_acc"] for c in stuck.extra["checks"]]
    assert stuck.extra["stop_reason"] == "plateau" and len(accs) < 10
    assert accs[-1] <= max(accs[:-1]) and all(a > max(accs[:i], default=-1) for i, a in enumerate(accs[:-1]))
    # nothing removed (a class request's default: no reset, retain-only): nothing to watch, no check paid, and
    # ``rounds`` counts rounds ("auto": one), then the head calibration
    kept = federated_unlearn(sim.model, sim.clients, ForgetRequest(classes=[3]), max_steps=3, trained_epochs=4)
    assert kept.extra["rounds"] == kept.extra["round_cap"] == 1 and "checks" not in kept.extra
    assert kept.extra["calibration_rounds"] == 4 and not [k for k in kept.traffic.payload if k.startswith("check/")]
    assert len(federated_unlearn(sim.model, sim.clients, LEAVE, rounds=3, reset="none", max_steps=1).history) == 3
    # the checks' bytes are in the totals; one check costs far less than the model
    paid = sum(b.total for k, b in slow.traffic.payload.items() if k.startswith("check/"))
    assert slow.bytes["checks"] == paid > 0
    assert slow.bytes["total"] == slow.bytes["scoring"] + slow.bytes["statistics"] + paid + sum(
        r["bytes_down"] + r["bytes_up"] for r in slow.history)


def test_repair_respects_the_cap_and_one_round_pays_no_check(sim):
    capped = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=2, **SLOW)
    assert capped.extra["rounds"] == 2 and capped.extra["stop_reason"] == "round cap"
    one = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=1, **SLOW)
    fixed = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=1, early_stopping=False, **SLOW)
    assert "checks" not in one.bytes and not [k for k in one.traffic.payload if k.startswith("check/")]
    assert one.bytes == fixed.bytes and "checks" not in one.extra
    for k, v in get_arrays(fixed.model).items():
        assert torch.equal(get_arrays(one.model)[k], v), k
    from lightning_unlearn.config import federated_round_cap

    # without early stopping the rounds are exactly ``rounds``; "auto" is one round then, a share of FedAvg's with it
    assert len(federated_unlearn(sim.model, sim.clients, LEAVE, rounds=3, early_stopping=False, **SLOW).history) == 3
    assert federated_round_cap("auto", False, 40) == 1 and federated_round_cap("auto", True, 40) == 10
    assert federated_round_cap("auto", True, None) == federated_round_cap("auto", True, 10) == 3
    with pytest.raises(ValueError, match=r"rounds must be an integer >= 1 or 'auto', got 'many'"):
        federated_unlearn(sim.model, sim.clients, LEAVE, rounds="many")
    from lightning_unlearn.config import UnlearnConfig
    from lightning_unlearn.federated.checkpoint import ServerCheckpoint
    from lightning_unlearn.federated.federation import as_federation
    from lightning_unlearn.federated.protocol import run_unlearning
    from lightning_unlearn.federated.runner import FederatedSettings

    # a checkpoint written mid-repair without the rule's state is refused, not resumed with a guessed reference
    old = ServerCheckpoint(mask=capped.mask, current=get_arrays(capped.model))
    cfg = UnlearnConfig.build(**SLOW).resolved(LEAVE, "federated")
    with pytest.raises(ValueError, match="holds no stopping-rule state"):
        run_unlearning(as_federation(sim.clients), copy.deepcopy(sim.model), LEAVE, cfg, 10, checkpoint=old)

    with pytest.raises(ValueError, match=r"unlearn_rounds must be an integer >= 1 or 'auto', got 0"):
        FederatedSettings(unlearn_rounds=0)  # the CLI's settings, before any training


def test_checks_send_only_the_selected_values(sim):
    grid = recording(sim.clients)
    result = federated_unlearn(sim.model, sim.clients, LEAVE, rounds=3, check_samples=64, **SLOW)
    checks = [m for d, _, op, m in exchanges(grid) if d == "down" and op == "evaluate"]
    assert all(m.config["max_samples"] == 64 and m.config["seed"] == 0 for m in checks)  # one seeded subsample
    selected = {n: int(m.sum()) for n, m in result.mask.masks.items() if m.any()}
    assert len(checks) == 3 * (1 + result.extra["rounds"])  # the deployed model's, then one per round
    assert all(not m.arrays and m.config["base"] == "deployed" for m in checks[:3])  # the clients hold it
    for m in checks[3:]:  # the selected slices (and the pooled statistics of selected BatchNorm channels)
        assert {k: v.numel() for k, v in m.arrays.items() if k in selected} == selected
        assert all(k in selected or ".running_" in k for k in m.arrays)
        assert m.channels is None  # every client got the mask with round 0
        assert m.nbytes < sum(v.numel() * v.element_size() for v in get_arrays(result.model).values()) / 2


def _server(checkpoint=None, fail_at_unlearn_message: int | None = None):
    torch.manual_seed(0)
    crash = die_at("train.unlearn", fail_at_unlearn_message)
    grid = LocalGrid(make_client_app(MODEL_FN, PARTS, mods=[crash]), PARTS.num_clients)
    return run_server(grid, MODEL_FN(), PARTS.num_clients, FEDAVG, UnlearnPlan(LEAVE, rounds=10, **SLOW),
                      checkpoint=checkpoint)


def test_server_app_agrees_with_in_process_and_resumes_mid_repair(tmp_path):
    straight = _server()
    torch.manual_seed(0)
    model, fed = MODEL_FN(), Federation(LocalGrid(make_client_app(MODEL_FN, PARTS), 3), 3)
    run_fedavg(model, fed, **vars(FEDAVG), progress=False)
    ours = federated_unlearn(model, fed, LEAVE, rounds=10, trained_epochs=4, **SLOW)
    assert len(straight.unlearning) == len(ours.history)  # the ServerApp stopped after as many rounds
    assert 1 < len(ours.history) < 10
    assert [r["retain_acc"] for r in straight.unlearning] == [r["retain_acc"] for r in ours.history]
    assert [e["retain_acc"] for e in straight.evaluation] == [r["retain_acc"] for r in ours.history]
    for k, v in get_arrays(ours.model).items():
        assert torch.equal(straight.arrays[k], v), k
    # a server that died in masked round 2 resumes there with the same mask and stopping state
    with pytest.raises(Exception, match=NODE_DIED):
        _server(tmp_path, fail_at_unlearn_message=2 * 3 + 1)
    resumed = _server(tmp_path)
    assert resumed.resumed == {"fedavg_rounds": 4, "mask": True, "rounds_done": 2}
    assert [r["round"] for r in resumed.unlearning] == [r["round"] for r in straight.unlearning]
    assert [e["retain_acc"] for e in resumed.evaluation] == [e["retain_acc"] for e in straight.evaluation]
    for k, v in straight.arrays.items():
        assert torch.equal(resumed.arrays[k], v), k
