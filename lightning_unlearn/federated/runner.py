"""The federated side of ``lightning-unlearn fit | unlearn | evaluate``: the config, not code, switches to it.

A config whose ``data`` is a :class:`~lightning_unlearn.data.FederatedDataModule` (with a ``request``
attribute, as the presets have) runs these instead of ``Trainer.fit``; the ``federated:`` section
of the config is :class:`FederatedSettings`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.federated.baselines import federated_retrain
from lightning_unlearn.federated.client import get_arrays
from lightning_unlearn.federated.messages import Broadcast, tensor_bytes
from lightning_unlearn.federated.protocol import federated_unlearn
from lightning_unlearn.federated.simulation import FederatedSimulation


@dataclass
class FederatedSettings:
    """Schedule of a federated run (ignored by central configs).

    Args:
        rounds: FedAvg rounds for training (and for the retrained reference).
        local_epochs: local epochs per client per round.
        local_steps: cap on local optimizer steps per client per round (None: whole epochs).
        fraction: share of clients sampled per round.
        unlearn_rounds: masked unlearning rounds.
        unlearn_steps: local steps per client per unlearning round.
        lr_scale: learning-rate multiplier for the masked rounds.
        score_samples: at most this many forget samples scored per client.
        output_dir: where ``fit`` writes ``original.ckpt`` and the per-round server checkpoints.
        dp_target_epsilon, dp_noise_multiplier: local DP-SGD at every client during ``fit`` (Opacus, the
            ``dp`` extra); give one. The epsilon is per client, for the whole training.
        dp_max_grad_norm, dp_delta: per-sample clipping norm and delta of the DP runs.
    """

    rounds: int = 5
    local_epochs: int = 1
    local_steps: int | None = None
    fraction: float = 1.0
    unlearn_rounds: int = 1
    unlearn_steps: int | None = 5
    lr_scale: float = 1.0
    score_samples: int | None = 256
    output_dir: str = "outputs/federated"
    dp_target_epsilon: float | None = None
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5


def is_federated(datamodule: Any) -> bool:
    return isinstance(datamodule, FederatedDataModule)


def _simulation(model: pl.LightningModule, fdm: FederatedDataModule, s: FederatedSettings, seed: int,
                checkpoints: bool = False) -> FederatedSimulation:
    return FederatedSimulation(
        fdm, model, rounds=s.rounds, local_epochs=s.local_epochs, fraction=s.fraction, seed=seed,
        trainer_kwargs={"max_steps": s.local_steps} if s.local_steps else None,
        checkpoint_dir=str(Path(s.output_dir) / "rounds") if checkpoints else None,
    )


def federated_fit(model: pl.LightningModule, fdm: FederatedDataModule, settings: FederatedSettings, seed: int = 0) -> Path:
    """FedAvg training; writes ``<output_dir>/original.ckpt`` (a new name if it exists). Resumes from round checkpoints."""
    from lightning_unlearn.evaluation.report import unique_path

    dp = settings.dp_target_epsilon is not None or settings.dp_noise_multiplier is not None
    if dp:
        from lightning_unlearn.privacy.federated import attach_settings_dp, prepare_model

        prepare_model(model)
    # with DP no resume: the round checkpoints do not carry the clients' privacy accountants
    sim = _simulation(model, fdm, settings, seed, checkpoints=not dp)
    privacy = attach_settings_dp(sim.clients, settings) if dp else None
    result = sim.train(resume=not dp)
    path = _save(sim.model, unique_path(Path(settings.output_dir) / "original.ckpt"))
    print(f"FedAvg: {settings.rounds} rounds, test acc {result.history[-1].get('test_acc', float('nan')):.4f}; "
          f"checkpoint: {path}")
    if privacy is not None:
        print(privacy.describe())
    return path


def deployed_simulation(model: pl.LightningModule, fdm: FederatedDataModule, settings: FederatedSettings, seed: int):
    """A federation whose clients hold ``model`` as the deployed global model and know the request."""
    sim = _simulation(model, fdm, settings, seed)
    arrays = get_arrays(model)
    for client in sim.clients:
        client.deploy(Broadcast(arrays))
    plan = sim.request(fdm.request)
    return sim, plan


def federated_unlearn_checkpoint(
    model: pl.LightningModule, fdm: FederatedDataModule, settings: FederatedSettings, method: str, ratio: float,
    objective: str, seed: int,
):
    """Run the federated unlearning protocol from a trained global model; returns (simulation, result)."""
    sim, _ = deployed_simulation(model, fdm, settings, seed)
    result = federated_unlearn(
        sim.model, sim.clients, fdm.request, method=method, ratio=ratio,
        objective=objective, rounds=settings.unlearn_rounds,
        max_steps=settings.unlearn_steps, max_samples=settings.score_samples, lr_scale=settings.lr_scale, seed=seed,
    )
    return sim, result


def federated_reference(sim: FederatedSimulation, plan, settings: FederatedSettings, seed: int):
    """Federated retraining from scratch without the forget data (the exact reference)."""
    return federated_retrain(sim.model, sim.clients, plan, settings.rounds, settings.local_epochs, settings.fraction,
                             seed=seed)


def fedavg_round_bytes(model: torch.nn.Module, num_clients: int, fraction: float = 1.0) -> int:
    """Bytes of one full FedAvg round: the whole model down to and back up from every sampled client."""
    sampled = max(1, round(fraction * num_clients))
    return 2 * sampled * tensor_bytes(get_arrays(model))


def _save(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint ``lightning-unlearn unlearn`` and ``LightningModule.load_from_checkpoint`` can read."""
    from lightning_unlearn.evaluation.report import _atomic_write

    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "hyper_parameters": dict(getattr(model, "hparams", {})), "pytorch-lightning_version": pl.__version__}
    return _atomic_write(path, lambda f: torch.save(state, f))

