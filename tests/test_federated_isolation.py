"""Methods run one after another on one simulated federation do not change each other's results.

The in-process clients share one working model; a masked round held its BatchNorm layers in eval mode and left them
so, and every later FedAvg training on that federation (the retrained reference of the next request) then ran with
frozen statistics: the MNIST client request's reference read 92.04 / 94.88 / 94.59 after the class request's
baselines and 94.46 / 96.50 / 96.09 when it ran first.
"""
import hashlib

import torch

from lightning_unlearn.data import FederatedDataModule, load_digits_datasets
from lightning_unlearn.federated import FederatedSimulation
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.request import ForgetRequest


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for _, v in sorted(get_arrays(model).items()):
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def test_a_masked_baseline_does_not_change_the_next_retrained_reference():
    train, test = load_digits_datasets()
    fdm = FederatedDataModule(train, test, num_clients=3, partition="iid", seed=0, batch_size=64)
    torch.manual_seed(0)
    sim = FederatedSimulation(fdm, SmallCNN(), rounds=2, seed=0, trainer_kwargs={"max_steps": 5}, progress=False)
    sim.train()
    leave = ForgetRequest(clients=[1])

    def retrained() -> str:
        return _digest(B.federated_retrain(sim.model, sim.clients, sim.request(leave), 2, seed=0, progress=False).model)

    first = retrained()
    plan = sim.request(ForgetRequest(classes=[3]))
    B.federated_finetune(sim.model, sim.clients, plan, sim.layers(), max_steps=3)
    assert all(m.training for m in sim.clients[0].model.modules())
    assert retrained() == first


def test_each_run_on_one_federation_reports_its_own_bytes():
    """Runs share round labels (``score``, ``unlearn/0``): a second request on a reused Federation reported the sum
    of both runs' bytes (scoring 2976 instead of 1488, a masked round 102816 instead of 51408)."""
    from lightning_unlearn.federated import federated_unlearn, make_clients, run_fedavg
    from lightning_unlearn.federated.federation import Federation

    train, test = load_digits_datasets()
    fdm = FederatedDataModule(train, test, num_clients=3, partition="iid", seed=0, batch_size=64)
    torch.manual_seed(0)
    model = SmallCNN()
    clients = make_clients(fdm, model)
    fed = Federation(clients.grid, len(clients))
    run_fedavg(model, fed, 1, seed=0, progress=False, local_config={"max_steps": 2})
    runs = [federated_unlearn(model, fed, ForgetRequest(classes=[3]), max_steps=2, calibrate="none") for _ in range(2)]
    assert runs[0].bytes == runs[1].bytes and runs[0].bytes["scoring"] > 0
    assert [r["bytes_down"] for r in runs[0].history] == [r["bytes_down"] for r in runs[1].history]
    assert fed.traffic.payload["score"].total == 2 * runs[0].bytes["scoring"]  # the federation's own count keeps all
