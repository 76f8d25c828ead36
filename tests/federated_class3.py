"""The small federation the engine-parity and calibration tests share: three IID digits clients, a SmallCNN
briefly trained (one FedAvg round of 10 local steps), a class-3 request."""
from __future__ import annotations

import functools
from typing import Iterator

import torch

from lightning_unlearn import ForgetRequest
from lightning_unlearn.federated import FederatedPartitions, FederatedSimulation
from lightning_unlearn.models import SmallCNN

MODEL_FN = functools.partial(SmallCNN, channels=(8, 16), hidden=32, lr=3e-3)
PARTS = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)
REQUEST = ForgetRequest(classes=[3])


def trained_federation() -> Iterator[FederatedSimulation]:
    """Yield the trained federation with the request made, on one thread (restored afterwards): a fixture body."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sim = FederatedSimulation(PARTS.datamodule(), MODEL_FN(), rounds=1, trainer_kwargs={"max_steps": 10}, progress=False)
    sim.train()
    sim.request(REQUEST)
    yield sim
    torch.set_num_threads(before)
