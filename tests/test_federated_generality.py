"""Federated unlearning on a user's own architecture: a small residual network with BatchNorm trained by FedAvg with
SGD (momentum, weight decay) at a rate tuned for batch statistics. The masked rounds run with every BatchNorm in eval
mode, where that rate makes the local fit diverge: the run stops with one line naming the client, the round and what
to change (before, NaN weights reached the server as a contract error), and the change it names works."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_unlearn import ForgetRequest
from lightning_unlearn._training import SeededData, fit
from lightning_unlearn.callbacks import GradientMask
from lightning_unlearn.callbacks.divergence import DivergenceError, DivergenceGuard
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn.mask import BN_TYPES, ParameterMask
from lightning_unlearn.models import ClassifierModule, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = ForgetRequest(classes=[3])


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class TinyResNet(ClassifierModule):
    """Conv-BN stem, two residual blocks, a linear head; SGD as such a network is usually trained."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.fixture(scope="module")
def sim(digits, one_thread) -> FederatedSimulation:
    """4 clients, Dirichlet(0.5) digits, 8 FedAvg rounds: test accuracy about 0.8 (trained with batch statistics)."""
    fdm = FederatedDataModule(*digits, num_clients=4, partition="dirichlet", alpha=0.5, seed=0, batch_size=32)
    torch.manual_seed(0)
    sim = FederatedSimulation(fdm, TinyResNet(), rounds=8, local_epochs=1, seed=0, progress=False)
    sim.train()
    sim.request(REQUEST)
    return sim


def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _unlearns_exactly(sim: FederatedSimulation, **settings) -> dict[str, float]:
    """Unlearn class 3 with ``settings``: finite, every frozen element and running statistic bit-equal."""
    original = copy.deepcopy(sim.model.state_dict())
    result = federated_unlearn(sim.model, sim.clients, REQUEST, trained_epochs=8, **settings)
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.is_floating_point())
    for name, p in result.model.named_parameters():
        keep = result.mask.masks[name]
        assert torch.equal(p.detach()[~keep], original[name][~keep]), name
    for name, module in result.model.named_modules():  # no reset: every running statistic is the deployed one
        if isinstance(module, BN_TYPES):
            assert torch.equal(module.running_mean, original[f"{name}.running_mean"])
            assert torch.equal(module.running_var, original[f"{name}.running_var"])
    return sim.evaluate(result.model)


def test_a_diverging_masked_round_stops_with_one_line(sim):
    work = sim.clients[0].model  # the clients' shared working model: later fits must find their own modes
    modes = _modes(work)
    with pytest.raises(DivergenceError) as caught:
        federated_unlearn(sim.model, sim.clients, REQUEST, trained_epochs=8)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unlearning round 0: client 2: the masked round's local fit diverged (the training "
                              "loss is nan at step ")
    assert message.endswith("lower lr_scale or set bn_stats='selected'")
    assert _modes(work) == modes  # the failed fit gave BatchNorm its train mode back


def test_the_change_the_message_names_unlearns_exactly(sim):
    accuracy = _unlearns_exactly(sim, lr_scale=0.1)
    assert accuracy["forget_acc"] == 0.0
    assert accuracy["remaining_acc"] > 0.85  # measured 0.92 (original 0.82)


@pytest.mark.xfail(strict=True, raises=DivergenceError, reason="open: at the module's own rate the eval-mode repair "
                   "diverges on this network; no guard found so far leaves healthy rounds unchanged and repairs it")
def test_residual_batchnorm_model_unlearns_a_class_at_defaults(sim):
    accuracy = _unlearns_exactly(sim)
    assert accuracy["forget_acc"] <= 0.05 and accuracy["remaining_acc"] > 0.7


def test_a_last_step_to_non_finite_weights_stops_too(sim):
    """A finite loss whose step overflows the weights (here the round's only step): caught before the reply."""
    with pytest.raises(DivergenceError, match=r"^unlearning round 0: client \d: the masked round's local fit "
                                              r"diverged \('stem\.0\.weight' is non-finite after it\)"):
        federated_unlearn(sim.model, sim.clients, REQUEST, lr_scale=6e39, max_steps=1, calibrate="none")


class NanRetainInputs(torch.utils.data.Dataset):
    """A client's data whose retain samples (label != 3) have non-finite inputs; labels unchanged."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x if int(y) == 3 else torch.full_like(x, float("nan"))), y


def test_non_finite_data_fails_before_any_update(sim):
    client = sim.clients[1]
    dataset, client.dataset = client.dataset, NanRetainInputs(client.dataset)
    try:
        with pytest.raises(DivergenceError, match=r"^unlearning round 0: client 1: in its masked round the training "
                                                  r"loss is nan before any optimizer step; check the client's data"):
            federated_unlearn(sim.model, sim.clients, REQUEST, trained_epochs=8, calibrate="none")
    finally:
        client.dataset = dataset


def test_the_guard_leaves_a_healthy_fit_bit_identical(digits):
    """What keeps every model that trains fine unchanged: the guard only reads the loss."""
    train = torch.utils.data.Subset(digits[0], range(256))
    torch.manual_seed(0)
    model = SmallCNN(channels=(8, 16), hidden=32, lr=3e-3)
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for name, rows in (("conv2.weight", [0, 1]), ("conv2.bias", [0, 1]), ("fc2.weight", [3]), ("fc2.bias", [3])):
        masks[name][rows] = True
    mask = ParameterMask(masks)
    runs = []
    for callbacks in ([GradientMask(mask)], [DivergenceGuard(), GradientMask(mask)]):
        work = copy.deepcopy(model)
        torch.manual_seed(1)
        fit(work, SeededData(train, 32, 0), 2, callbacks)
        runs.append(work.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
