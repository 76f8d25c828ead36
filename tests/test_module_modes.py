"""Evaluation passes give every module back its own mode: a submodule the user keeps in eval mode stays so.

``model.train(was_training)`` after a pass flipped every submodule to the top module's mode, so a frozen backbone's
BatchNorm (kept in eval mode on purpose) would have started updating its statistics in the next fit.
"""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.evidence.attacks import logit_confidence
from lightning_unlearn.evidence.membership import sample_outputs
from lightning_unlearn.federated.client import batchnorm_moments, cdp_activations
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.metrics import accuracy
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.reset import reestimate_batchnorm
from lightning_unlearn.scoring import channel_scores, discover_layers

X = torch.randn(16, 1, 8, 8)
Y = torch.arange(16) % 10
DATA = TensorDataset(X, Y)


def _passes():
    loader = DataLoader(DATA, batch_size=8)
    return {
        "channel_scores": lambda m: channel_scores(m, loader, "grad_x_act"),
        "discover_layers": lambda m: discover_layers(m, X[:2]),
        "accuracy": lambda m: accuracy(m, loader, 10),
        "logit_confidence": lambda m: logit_confidence(m, DATA),
        "sample_outputs": lambda m: sample_outputs(m, DATA),
        "cdp_activations": lambda m: cdp_activations(m, loader, discover_layers(m, X[:2])),
        "reestimate_batchnorm": lambda m: reestimate_batchnorm(
            m, ParameterMask.from_channels(m, {"conv1": [0]}, discover_layers(m, X[:2])), loader, 2),
        "batchnorm_moments": lambda m: batchnorm_moments(
            m, ParameterMask.from_channels(m, {"conv1": [0]}, discover_layers(m, X[:2])), loader, 2),
    }


@pytest.mark.parametrize("name", list(_passes()))
def test_a_submodule_kept_in_eval_mode_stays_in_eval_mode(name):
    model = SmallCNN()
    model.train()
    model.bn1.eval()  # the user's choice: this BatchNorm's statistics stay as they are
    before = [m.training for m in model.modules()]
    _passes()[name](model)
    assert [m.training for m in model.modules()] == before
