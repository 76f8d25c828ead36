"""The clients' calibration round builds the module's optimizer even when ``configure_optimizers`` needs a Trainer
(a scheduler sized by ``estimated_stepping_batches``), without moving a parameter."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_unlearn.federated.client import _module_optimizer


class OneCycleModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_an_optimizer_that_needs_its_trainer_is_built_inside_a_fit_stopped_before_any_batch(one_thread):
    torch.manual_seed(0)
    model = OneCycleModule()
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = _module_optimizer(model, data)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a parameter moved"


def test_a_plain_configure_optimizers_is_called_directly(one_thread):
    model = torch.nn.Module()
    model.configure_optimizers = lambda: [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)]
    assert isinstance(_module_optimizer(model, None), torch.optim.SGD)
