"""The federated side of ``lightning-unlearn fit | unlearn | evaluate``: the config, not code, switches to it."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch

from lightning_unlearn._io import save_torch, unique_path
from lightning_unlearn.config import check_round_cap
from lightning_unlearn.data.federated import FederatedDataModule
from lightning_unlearn.federated.messages import tensor_bytes
from lightning_unlearn.federated.simulation import FederatedSimulation
from lightning_unlearn.mask.arrays import get_arrays

log = logging.getLogger(__name__)


@dataclass
class FederatedSettings:
    """Schedule of a federated run (ignored by central configs); how to unlearn is the ``unlearning:`` section.

    Args:
        rounds: FedAvg rounds for training (and for the retrained reference).
        local_epochs: local epochs per client per round.
        local_steps: cap on local optimizer steps per client per round (None: whole epochs).
        fraction: share of clients sampled per round in FedAvg and the masked rounds (scoring and the statistics
            round ask every client).
        unlearn_rounds: masked unlearning rounds (each client's budget: ``unlearning.epochs`` / ``max_steps``);
            under ``unlearning.early_stopping`` their cap; ``"auto"``: a quarter of ``rounds`` x ``local_epochs``.
        output_dir: where ``fit`` writes ``original.ckpt`` and the per-round server checkpoints.
        fresh: train from round 0 even if ``output_dir`` holds a resume file (one from another run is refused).
        dp_target_epsilon: local DP-SGD (Opacus) at every client during ``fit``, to this epsilon per client.
        dp_noise_multiplier: or at this fixed noise multiplier (give one of the two).
        dp_max_grad_norm: per-sample clipping norm of the DP runs.
        dp_delta: delta of the DP runs.
    """

    rounds: int = 5
    local_epochs: int = 1
    local_steps: int | None = None
    fraction: float = 1.0
    unlearn_rounds: int | str = "auto"
    output_dir: str = "outputs/federated"
    fresh: bool = False
    dp_target_epsilon: float | None = None
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        check_round_cap(self.unlearn_rounds, "unlearn_rounds")  # before any training: the masked rounds run last


def simulation(model: pl.LightningModule, fdm: FederatedDataModule, s: FederatedSettings, seed: int,
               checkpoints: bool = False) -> FederatedSimulation:
    """The in-process federation of ``fdm`` on the settings' schedule (``checkpoints``: per-round resume files)."""
    return FederatedSimulation(fdm, model, rounds=s.rounds, local_epochs=s.local_epochs, fraction=s.fraction,
                               seed=seed, trainer_kwargs={"max_steps": s.local_steps} if s.local_steps else None,
                               checkpoint_dir=str(Path(s.output_dir) / "rounds") if checkpoints else None)


def federated_fit(model: pl.LightningModule, fdm: FederatedDataModule, s: FederatedSettings, seed: int = 0,
                  echo: Callable[[str], None] | None = None) -> Path:
    """FedAvg training; writes ``<output_dir>/original.ckpt`` (a new name if it exists). Resumes from the round
    checkpoints, except with DP: they do not carry the clients' privacy accountants."""
    dp = s.dp_target_epsilon is not None or s.dp_noise_multiplier is not None
    if dp:
        from lightning_unlearn.privacy import attach_client_dp, make_dp_compatible

        if replaced := make_dp_compatible(model):  # before the federation copies it: server and clients agree
            warnings.warn("DP-SGD: replaced " + "; ".join(replaced) + ". The checkpoint will hold the new layers; name "
                          "a compatible model in the config (lightning_unlearn.privacy.models.DPSmallCNN for SmallCNN) "
                          "to load it later", UserWarning, stacklevel=2)
    sim = simulation(model, fdm, s, seed, checkpoints=not dp)
    privacy = None
    if dp:  # the budget covers the whole training: every round is a separate local fit
        steps = s.rounds * s.local_steps if s.local_steps else None
        privacy = attach_client_dp(sim.clients, target_epsilon=s.dp_target_epsilon,
                                   noise_multiplier=s.dp_noise_multiplier, max_grad_norm=s.dp_max_grad_norm,
                                   delta=s.dp_delta, steps=steps, epochs=None if steps else s.rounds * s.local_epochs)
    result = sim.train(resume=not dp and not s.fresh)
    path = save_checkpoint(sim.model, unique_path(Path(s.output_dir) / "original.ckpt"))
    say = echo or log.info
    say(f"FedAvg: {s.rounds} rounds, test acc {result.history[-1].get('test_acc', float('nan')):.4f}; "
        f"checkpoint: {path}")
    if privacy is not None:
        say(privacy.describe())
    return path


def fedavg_round_bytes(model: torch.nn.Module, num_clients: int, fraction: float = 1.0) -> int:
    """Bytes of one full FedAvg round: the whole model down to and back up from every sampled client."""
    return 2 * max(1, round(fraction * num_clients)) * tensor_bytes(get_arrays(model))


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint that ``lightning-unlearn unlearn`` and ``load_from_checkpoint`` read; never overwrites."""
    cls, hparams = type(model), dict(getattr(model, "hparams", {}))
    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "hyper_parameters": {**hparams, "_class_path": f"{cls.__module__}.{cls.__qualname__}"},
             "pytorch-lightning_version": pl.__version__}
    return save_torch(state, path, overwrite=False)
