"""Transformer-style models: a Linear layer over tokens has its channels on the last axis ``(N, tokens, C)``.
Every scoring method scores those channels (not the tokens), centrally and through the federated protocol."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn import ForgetRequest
from lightning_unlearn.data import FederatedDataModule
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn
from lightning_unlearn.federated import baselines as B
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import ClassifierModule
from lightning_unlearn.scoring import SCORING_METHODS, ChannelScorer, channel_scores

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS, WIDTH = 8, 12  # 8 tokens; 12 channels, so a score over the tokens has the wrong length


class TokenNet(ClassifierModule):
    """8x8 digits as 8 tokens of 8 pixels: a Linear over tokens, LayerNorm, self-attention, mean pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.embed(x.reshape(len(x), TOKENS, 8))))
        return self.head((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)


@pytest.fixture
def token_batch():
    torch.manual_seed(0)
    return TokenNet().eval(), torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))


def _embed_output_and_gradient(model, x, y):
    """The embedding's output (N, tokens, C), the gradient of the summed target logits on it, the target logits."""
    saved = {}

    def hook(_, __, out):
        out.retain_grad()
        saved["a"] = out

    handle = model.embed.register_forward_hook(hook)
    try:
        target = model(x).gather(1, y[:, None]).squeeze(1)
        target.sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return saved["a"].detach(), saved["a"].grad, target.detach()


@torch.no_grad()
def _target_without_channel(model, x, y, c: int) -> torch.Tensor:
    """The target logits with channel ``c`` of the embedding (its last axis) zeroed."""
    handle = model.embed.register_forward_hook(lambda _, __, out: out.index_fill(-1, torch.tensor([c]), 0.0))
    try:
        return model(x).gather(1, y[:, None]).squeeze(1)
    finally:
        handle.remove()


@pytest.mark.parametrize("method", SCORING_METHODS)
def test_every_method_scores_the_channels_of_a_linear_layer_over_tokens(token_batch, method):
    model, x, y = token_batch
    scores = channel_scores(model, DataLoader(TensorDataset(x, y), batch_size=8), method)
    assert {n: tuple(s.shape) for n, s in scores.items()} == {"embed": (WIDTH,), "head": (10,)}
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())


def test_token_scores_match_the_definitions_on_the_channel_axis(token_batch):
    """grad_x_act: sum over samples and tokens of gradient x activation per channel; gradcam: each channel's mean
    gradient over the tokens times its activations; ablation: the drop of the target logit with the channel zeroed."""
    model, x, y = token_batch
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    a, g, target = _embed_output_and_gradient(model, x, y)
    expected = {"grad_x_act": (g * a).sum((0, 1)) / len(x),
                "gradcam": (g.mean(1, keepdim=True) * a).sum((0, 1)) / len(x)}
    expected["ablation"] = torch.stack([(target - _target_without_channel(model, x, y, c)).sum() / len(x)
                                        for c in range(WIDTH)])
    for method, want in expected.items():
        got = channel_scores(model, loader, method)["embed"]
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6, msg=method)


def test_a_scorer_that_returns_scores_on_another_axis_is_refused(token_batch):
    model, x, y = token_batch

    class PerToken(ChannelScorer):  # a user scorer that sums over the channels and keeps the tokens
        name = "per_token"

        def score_batch(self, x, y):
            outs = []
            for layer in self.layers:
                handle = layer.register_forward_hook(lambda _, __, out: outs.append(out.detach()))
                try:
                    self.model(x)
                finally:
                    handle.remove()
            return [o.reshape(o.shape[0], o.shape[1], -1).sum((0, 2)) for o in outs]

    with pytest.raises(ValueError, match=r"scorer 'per_token' returned scores of shape \(8,\) for layer 'embed', "
                                         r"which has 12 output channels"):
        channel_scores(model, DataLoader(TensorDataset(x, y), batch_size=8), PerToken)


def test_federated_unlearning_of_a_token_model(digits):
    """The protocol end to end on a transformer-style model: the server accepts the clients' channel scores (one per
    channel), the class is forgotten, every element outside the mask stays bit-exact; CDP scores channels too."""
    torch.manual_seed(0)
    fdm = FederatedDataModule(*digits, num_clients=3, partition="iid", seed=0, batch_size=32)
    sim = FederatedSimulation(fdm, TokenNet(), rounds=3, trainer_kwargs={"max_steps": 15}, progress=False)
    sim.train()
    request = ForgetRequest(classes=[3])
    plan = sim.request(request)
    result = federated_unlearn(sim.model, sim.clients, request, trained_epochs=3)
    assert tuple(result.scores["embed"].shape) == (WIDTH,)
    assert frozen_elements_equal(result.model, sim.model.state_dict(), result.mask)
    assert sim.evaluate(result.model)["forget_acc"] <= 0.05 < sim.evaluate(sim.model)["forget_acc"]
    cdp = B.federated_cdp(sim.model, sim.clients, plan, sim.layers(), ratio=0.25, max_steps=2)
    assert len(cdp.extra["pruned_channels"]["embed"]) == 3  # a quarter of the 12 channels, not of the 8 tokens
