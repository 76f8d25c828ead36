"""Local DP-SGD in the federated simulation: one DifferentialPrivacy callback (and accountant) per client.
Epsilon is per client (sampling rates and step counts differ); the federation's guarantee is the worst client's."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from lightning_unlearn.privacy.callback import DifferentialPrivacy
from lightning_unlearn.privacy.compat import UnsupportedModelError, dp_compatibility_errors


@dataclass
class ClientPrivacy:
    """The per-client DP callbacks installed by :func:`attach_client_dp`, and their epsilons."""

    callbacks: dict[int, DifferentialPrivacy]

    def epsilons(self) -> dict[int, float]:
        """Epsilon each client has spent so far (at its callback's delta)."""
        return {cid: cb.epsilon for cid, cb in self.callbacks.items()}

    def worst(self) -> tuple[int, float]:
        """(client id, epsilon) of the client with the largest epsilon: the federation's guarantee."""
        return max(self.epsilons().items(), key=lambda item: item[1])

    def describe(self) -> str:
        """One line per client and the worst one, for a console."""
        lines = [f"DP-SGD per client (delta {next(iter(self.callbacks.values())).delta:g}):"]
        for cid, cb in self.callbacks.items():
            lines.append(f"  client {cid}: epsilon {cb.epsilon:.3f}, noise multiplier {cb.noise_multiplier:.3f}, "
                         f"sampling rate {cb.sample_rate or 0:.4f}, steps {cb.steps_taken}")
        cid, eps = self.worst()
        return "\n".join([*lines, f"  worst client {cid}: epsilon {eps:.3f} (the federation's guarantee)"])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Local fits inside the block run without DP (and spend no budget); e.g. forget-aware unlearning rounds."""
        before = {cid: cb.enabled for cid, cb in self.callbacks.items()}
        for cb in self.callbacks.values():
            cb.enabled = False
        try:
            yield
        finally:
            for cid, cb in self.callbacks.items():
                cb.enabled = before[cid]


def attach_client_dp(clients: Sequence[Any], **dp: Any) -> ClientPrivacy:
    """Give every client its own :class:`DifferentialPrivacy` callback for all its later local fits; a
    ``target_epsilon`` covers the whole planned local training (``steps`` or ``epochs``)."""
    if not clients:
        raise ValueError("attach_client_dp needs at least one client, got none")
    if dp.get("target_epsilon") is not None and dp.get("epochs") is None and dp.get("steps") is None:
        raise ValueError("a per-client target_epsilon needs the length of the whole federated training: pass steps= "
                         "(rounds x local steps) or epochs= (rounds x local epochs); each round is a separate fit")
    for model in {id(c.model): c.model for c in clients}.values():
        if errors := dp_compatibility_errors(model):
            raise UnsupportedModelError(
                f"the clients' {type(model).__name__} is not Opacus-compatible ({'; '.join(errors)}). Call "
                "lightning_unlearn.privacy.make_dp_compatible(model) before building the FederatedSimulation, "
                "so the server and the clients share the same (GroupNorm) layers")
    for client in clients:
        if any(isinstance(c, DifferentialPrivacy) for c in client.callbacks):
            raise ValueError(f"client {client.client_id} already trains with a DifferentialPrivacy callback")
    callbacks = {client.client_id: DifferentialPrivacy(**dp, fix_model=False) for client in clients}  # checks dp
    for client in clients:
        client.callbacks.append(callbacks[client.client_id])
    return ClientPrivacy(callbacks)
