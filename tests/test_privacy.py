"""DP-SGD with Opacus: epsilon accounting, BatchNorm replacement, exact masks on DP models, per-client DP, bad input."""
from __future__ import annotations

import copy
import importlib
import math
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_unlearn
from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.callbacks import SelectiveUnlearning
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.privacy import DifferentialPrivacy, attach_client_dp, epsilon_for, make_dp_compatible, noise_for
from lightning_unlearn.privacy.compat import UnsupportedModelError

try:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
except ImportError:  # only the missing-extra test can run; the others say why they skip
    RDPAccountant = get_noise_multiplier = None

needs_opacus = pytest.mark.skipif(
    RDPAccountant is None, reason="needs the dp extra: `make install` / pip install -e '.[dev,dp]'"
)

TINY = dict(channels=(8, 16), hidden=32, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


class Train(pl.LightningDataModule):
    def __init__(self, dataset, batch_size: int = 64):
        super().__init__()
        self.dataset, self.batch_size = dataset, batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def _tiny(seed: int = 0, **kw) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(**{**TINY, **kw})


@pytest.fixture(scope="module")
def dp_trained(digits):
    """SmallCNN trained 3 epochs with DP-SGD (noise 1.0) on digits, and its callback."""
    pl.seed_everything(0, verbose=False)
    model = _tiny()
    callback = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
    trainer = fit(model, Train(digits[0]), 3, [callback])
    return model, callback, trainer


# -- training and accounting ---------------------------------------------------------------------------
@needs_opacus
def test_epsilon_logged_every_epoch_and_grows(dp_trained, digits):
    model, callback, trainer = dp_trained
    eps = [row["epsilon"] for row in callback.history]
    assert len(eps) == 3 and all(a < b for a, b in zip(eps, eps[1:])), eps
    assert float(trainer.callback_metrics["dp/epsilon"]) == pytest.approx(eps[-1])
    assert [row["steps"] for row in callback.history] == [22, 44, 66]  # 1347 samples / 64 -> 22 batches per epoch
    # BatchNorm was replaced (and said so); the model still learned; Opacus left nothing behind
    assert callback.replaced == ["bn1: BatchNorm2d -> GroupNorm", "bn2: BatchNorm2d -> GroupNorm"]
    assert isinstance(model.bn1, nn.GroupNorm) and isinstance(model.bn2, nn.GroupNorm)
    assert accuracy(model, DataLoader(digits[1], batch_size=256), 10) > 0.5
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not model._forward_hooks and not model.conv1._forward_hooks and not model.fc2._backward_hooks


@needs_opacus
def test_epsilon_matches_opacus_rdp_accountant(dp_trained):
    _, callback, _ = dp_trained
    reference = RDPAccountant()
    for _ in range(callback.steps_taken):
        reference.step(noise_multiplier=1.0, sample_rate=1 / 22)
    assert callback.sample_rate == pytest.approx(1 / 22)
    assert callback.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    # the planning helper, on a textbook setting (MNIST, batch 256, 60 epochs, sigma 1.1)
    q, steps = 256 / 60_000, 60 * 60_000 // 256
    reference = RDPAccountant()
    reference.history = [(1.1, q, steps)]
    assert epsilon_for(1.1, q, steps, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert noise_for(3.0, q, steps, 1e-5) == get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")


@needs_opacus
def test_target_epsilon_calibrates_noise_for_the_planned_epochs(digits):
    pl.seed_everything(0, verbose=False)
    callback = DifferentialPrivacy(target_epsilon=1.0, max_grad_norm=1.0)
    fit(_tiny(), Train(digits[0]), 2, [callback])
    expected = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=1 / 22, epochs=2, accountant="rdp")
    assert callback.noise_multiplier == pytest.approx(expected)
    assert callback.steps_taken == 44
    assert 0.99 <= callback.epsilon <= 1.0  # spent (almost) exactly the budget, never more
    assert callback.history[0]["epsilon"] < callback.history[1]["epsilon"]


# -- unlearning a DP-trained model ------------------------------------------------------------------------
@needs_opacus
@pytest.mark.parametrize("dp_first", [True, False], ids=["dp-then-mask", "mask-then-dp"])
def test_masks_stay_exact_on_a_dp_trained_model(dp_trained, digits, dp_first):
    """Masked unlearning *with* DP-SGD: frozen elements bit-exact, and the mask acts after clipping and noise."""
    trained, _, _ = dp_trained
    model = copy.deepcopy(trained)
    model.hparams.optimizer, model.hparams.weight_decay = "adamw", 0.1  # decay moves zero-grad weights too
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    unlearn = SelectiveUnlearning(ratio=0.25, objective="retain", log_metrics=False)
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    callbacks = [dp, unlearn] if dp_first else [unlearn, dp]
    trainer = fit(model, dm, 1, callbacks, {"limit_train_batches": 5})
    mask = unlearn.mask
    assert 0 < mask.fraction < 0.5
    assert frozen_elements_equal(model, before, mask)
    moved = [n for n, p in model.named_parameters() if mask.masks[n].any() and not torch.equal(p.detach(), before[n])]
    assert moved, "the selected slices should have been updated"
    # zeroed after the noise: AdamW's first moment never saw a (noisy) gradient on a frozen element
    state = trainer.optimizers[0].state
    for name, p in model.named_parameters():
        frozen = ~mask.masks[name]
        if frozen.any():
            assert torch.count_nonzero(state[p]["exp_avg"][frozen]) == 0, name
    assert dp.steps_taken == 5 and dp.epsilon > 0


@needs_opacus
def test_forget_aware_objective_is_refused_with_a_clear_message(dp_trained, digits):
    model = copy.deepcopy(dp_trained[0])
    dm = UnlearningDataModule(digits[0], digits[1], ForgetRequest(classes=[3]), batch_size=64)
    with pytest.raises(ValueError, match="combined or dict loaders.*objective='retain'"):
        fit(model, dm, 1, [SelectiveUnlearning(ratio=0.25, objective="random_label", log_metrics=False),
                           DifferentialPrivacy(noise_multiplier=1.0)], {"limit_train_batches": 2})


# -- federated: local DP-SGD per client ---------------------------------------------------------------------
@needs_opacus
def test_per_client_dp_in_the_federated_simulation(digits):
    model = _tiny()
    assert make_dp_compatible(model) == ["bn1: BatchNorm2d -> GroupNorm", "bn2: BatchNorm2d -> GroupNorm"]
    fdm = FederatedDataModule(*digits, num_clients=3, partition="dirichlet", alpha=1.0, seed=0, batch_size=32)
    sim = FederatedSimulation(fdm, model, rounds=2, trainer_kwargs={"max_steps": 4}, progress=False)
    privacy = attach_client_dp(sim.clients, target_epsilon=1.0, steps=8 + 3)  # 2 rounds x 4 + 3 unlearning steps
    sim.train()
    after_training = privacy.epsilons()
    assert set(after_training) == {0, 1, 2} and all(0 < e < 1.0 for e in after_training.values())
    worst_id, worst = privacy.worst()
    assert worst == max(after_training.values()) and after_training[worst_id] == worst
    sizes = {k: len(fdm.client_indices(k)) for k in range(3)}
    small, large = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    assert privacy.callbacks[small].noise_multiplier > privacy.callbacks[large].noise_multiplier  # higher q, more noise
    assert [r["steps"] for r in privacy.callbacks[0].history] == [4, 8]  # one epoch-end per round, adding up
    assert privacy.callbacks[0].steps_taken == 8

    # sample-level unlearning with DP-SGD still on at every client: only the selected slices move
    rng = torch.Generator().manual_seed(0)
    request = ForgetRequest(sample_ids=torch.randperm(len(digits[0]), generator=rng)[:40].tolist())
    sim.request(request)
    deployed = {k: v.clone() for k, v in sim.model.named_parameters()}
    result = federated_unlearn(sim.model, sim.clients, request, ratio=0.2, max_steps=3, seed=0)
    assert result.config.objective == "retain"
    assert frozen_elements_equal(result.model, deployed, result.mask)
    assert all(privacy.epsilons()[k] > after_training[k] for k in range(3))
    assert privacy.worst()[1] <= 1.0 * 1.02  # retain splits have a slightly higher sampling rate than planned

    # class-level (random labels, combined batches) runs with DP paused; paused fits spend nothing
    spent = privacy.epsilons()
    sim.request(ForgetRequest(classes=[3]))
    with privacy.paused():
        result = federated_unlearn(sim.model, sim.clients, ForgetRequest(classes=[3]), ratio=0.2, max_steps=2, seed=0)
    assert privacy.epsilons() == spent and all(cb.enabled for cb in privacy.callbacks.values())


@needs_opacus
def test_client_dp_refuses_batchnorm_models_and_open_budgets(digits):
    fdm = FederatedDataModule(*digits, num_clients=2, partition="iid", seed=0, batch_size=32)
    sim = FederatedSimulation(fdm, _tiny(), rounds=1, progress=False)
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm.*make_dp_compatible\(model\) before building"):
        attach_client_dp(sim.clients, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="steps=.*rounds x local steps"):
        attach_client_dp(sim.clients, target_epsilon=3.0)
    with pytest.raises(ValueError, match="at least one client"):
        attach_client_dp([], noise_multiplier=1.0)


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # makes `import opacus` raise ImportError
    for name in [m for m in sys.modules if m.startswith("lightning_unlearn.privacy")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(lightning_unlearn, "privacy", raising=False)
    privacy = importlib.import_module("lightning_unlearn.privacy")  # importing needs no opacus
    with pytest.raises(ImportError, match=r"pip install lightning-unlearn\[dp\]"):
        privacy.DifferentialPrivacy(noise_multiplier=1.0)
    with pytest.raises(ImportError, match=r"pip install lightning-unlearn\[dp\]"):
        privacy.make_dp_compatible(nn.Linear(2, 2))


class WithBuffer(nn.Module):
    """A trainable layer with a buffer: Opacus refuses it and has no fixer for it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("running", torch.zeros(n))

    def forward(self, x):
        return x * self.scale


class Unfixable(SmallCNN):
    def __init__(self):
        super().__init__(**TINY)
        self.gate = WithBuffer(10)

    def forward(self, x):
        return self.gate(super().forward(x))


@needs_opacus
def test_unfixable_model_is_refused_naming_the_layer(digits):
    with pytest.raises(UnsupportedModelError, match=r"ModuleValidator.fix has no replacement for.*gate"):
        fit(Unfixable(), Train(digits[0]), 1, [DifferentialPrivacy(noise_multiplier=1.0)])
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm.*fix_model=True"):
        fit(_tiny(), Train(digits[0]), 1, [DifferentialPrivacy(noise_multiplier=1.0, fix_model=False)])


@needs_opacus
@pytest.mark.parametrize("epsilon", [0, -1.0, math.inf, math.nan])
def test_epsilon_must_be_positive(epsilon):
    with pytest.raises(ValueError, match=r"target_epsilon must be a finite number > 0, got .*allowed: \(0, inf\)"):
        DifferentialPrivacy(target_epsilon=epsilon)


@needs_opacus
def test_non_poisson_loader_with_target_epsilon_is_refused():
    with pytest.raises(ValueError, match="target_epsilon needs Poisson sampling.*poisson_sampling=False with noise_multiplier"):
        DifferentialPrivacy(target_epsilon=3.0, poisson_sampling=False)
    DifferentialPrivacy(noise_multiplier=1.0, poisson_sampling=False)  # allowed: the user owns the sampling


class Stream(IterableDataset):
    def __iter__(self):
        for i in range(64):
            yield torch.zeros(1, 8, 8), i % 10


class StreamData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=16)


@needs_opacus
def test_iterable_loader_cannot_be_poisson_sampled():
    with pytest.raises(ValueError, match="Poisson sampling needs a map-style dataset.*IterableDataset Stream"):
        fit(_tiny(), StreamData(), 1, [DifferentialPrivacy(noise_multiplier=1.0)])


@needs_opacus
@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of target_epsilon and noise_multiplier"),
    ({"target_epsilon": 1.0, "noise_multiplier": 1.0}, "exactly one of target_epsilon and noise_multiplier"),
    ({"noise_multiplier": 0.0}, r"noise_multiplier must be a finite number > 0, got 0.0"),
    ({"noise_multiplier": 1.0, "max_grad_norm": -1}, r"max_grad_norm must be .* got -1"),
    ({"noise_multiplier": 1.0, "delta": 1.5}, r"delta must be in \(0, 1\), got 1.5"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, r"unknown accountant 'moments'; allowed .*'rdp', 'prv', 'gdp'"),
    ({"target_epsilon": 1.0, "epochs": 2, "steps": 3}, "at most one of epochs and steps"),
    ({"noise_multiplier": 1.0, "loss_reduction": "none"}, r"unknown loss_reduction 'none'; allowed .*'mean', 'sum'"),
])
def test_bad_arguments_name_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifferentialPrivacy(**kwargs)


# -- configs and the command line ----------------------------------------------------------------------------
CLI_CONFIG = """
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, logger: false}}
model:
  class_path: lightning_unlearn.privacy.models.DPSmallCNN
  init_args: {{channels: [8, 16], hidden: 32, lr: 0.003}}
data:
  class_path: lightning_unlearn.data.presets.FederatedDigitsData
  init_args: {{num_clients: 2, partition: iid, forget_classes: [3], batch_size: 32}}
federated: {{rounds: 2, local_steps: 3, output_dir: {out}, dp_noise_multiplier: 1.0}}
"""


@needs_opacus
def test_federated_dp_fit_from_a_config(tmp_path, capsys):
    """`lightning-unlearn fit` with dp_* settings: local DP-SGD per client, epsilons printed, a GroupNorm checkpoint."""
    from lightning_unlearn.cli import main
    from lightning_unlearn.privacy.models import DPSmallCNN

    config = tmp_path / "dp.yaml"
    config.write_text(CLI_CONFIG.format(out=tmp_path / "out"))
    main(["fit", "--config", str(config)])
    out = capsys.readouterr().out
    q, steps = 1 / 22, 6  # 674 samples per client / 32 -> 22 batches; 2 rounds x 3 steps
    assert "client 0: epsilon" in out and "client 1: epsilon" in out
    assert f"worst client 0: epsilon {epsilon_for(1.0, q, steps):.3f}" in out or \
        f"worst client 1: epsilon {epsilon_for(1.0, q, steps):.3f}" in out
    state = torch.load(tmp_path / "out" / "original.ckpt", weights_only=False)["state_dict"]
    assert "bn1.running_mean" not in state  # GroupNorm: what `unlearn` with the same config builds
    DPSmallCNN(channels=(8, 16), hidden=32).load_state_dict(state)


def test_dp_small_cnn_is_what_make_dp_compatible_makes_of_small_cnn():
    made = _tiny()
    if RDPAccountant is not None:
        make_dp_compatible(made)
    else:  # without opacus the class still builds (reading DP checkpoints needs no Opacus)
        made.bn1, made.bn2 = nn.GroupNorm(8, 8), nn.GroupNorm(16, 16)
    from lightning_unlearn.privacy.models import DPSmallCNN

    born = DPSmallCNN(**TINY)
    assert {k: v.shape for k, v in born.state_dict().items()} == {k: v.shape for k, v in made.state_dict().items()}
    assert repr(born.bn2) == repr(made.bn2)


@needs_opacus
def test_a_resumed_run_keeps_counting_epsilon(digits, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_unlearn._training import QUIET_TRAINER

    pl.seed_everything(0, verbose=False)
    first = DifferentialPrivacy(noise_multiplier=1.0)
    fit(_tiny(), Train(digits[0]), 1, [first, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        {"enable_checkpointing": True})
    resumed = DifferentialPrivacy(noise_multiplier=1.0)
    trainer = pl.Trainer(**QUIET_TRAINER, max_epochs=2, callbacks=[resumed], default_root_dir=tmp_path)
    trainer.fit(_tiny(), datamodule=Train(digits[0]), ckpt_path=tmp_path / "last.ckpt")  # BatchNorm model: fixed in setup
    assert resumed.steps_taken == 44
    assert resumed.epsilon == pytest.approx(epsilon_for(1.0, 1 / 22, 44), rel=1e-12)
    assert [r["steps"] for r in resumed.history] == [22, 44]
