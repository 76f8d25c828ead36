"""Channel scoring: the method registry, every method, ablation vs captum, scores agree with intervention."""
import warnings

import pytest
import torch
from captum.attr import LayerFeatureAblation
from torch import Tensor, nn

import lightning_unlearn.scoring as attribution
from lightning_unlearn.scoring import SCORING_METHODS, ChannelScorer, channel_scores, discover_layers, register_scorer
from lightning_unlearn.config import SCORERS, check_method

BUILT_IN = ("grad_x_act", "ablation", "gradcam", "conductance", "weight_saliency")


def captum_ablation_scores(model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Reference: captum ``LayerFeatureAblation`` with one feature group per output channel, mean over samples."""
    with torch.no_grad():
        out_shape = None

        def grab(_, __, out):
            nonlocal out_shape
            out_shape = out.shape

        h = layer.register_forward_hook(grab)
        model(x[:1])
        h.remove()
        mask = torch.arange(out_shape[1], device=x.device).view(1, -1, *([1] * (len(out_shape) - 2)))
        mask = mask.expand(1, *out_shape[1:])
        attr = LayerFeatureAblation(model, layer).attribute(x, target=y, layer_mask=mask, layer_baselines=0.0)
    # captum gives every element of a feature group the group's total: read one element per channel.
    return attr.reshape(attr.shape[0], attr.shape[1], -1)[:, :, 0].double().mean(0)


class WeightNorm(ChannelScorer):
    """A user's method: the L2 norm of each output channel's weights (data-independent), counted per sample."""

    name = "test_weight_norm"
    default_max_samples = 10

    def score_batch(self, x, y):
        return [layer.weight.detach().reshape(layer.weight.shape[0], -1).norm(dim=1) * len(x) for layer in self.layers]


@pytest.fixture
def user_scorer():
    register_scorer(WeightNorm)
    yield WeightNorm
    SCORERS.pop(WeightNorm.name)


def test_registry_is_the_single_source_of_method_names(user_scorer):
    assert SCORING_METHODS == BUILT_IN  # the import-time snapshot: built-ins, default first
    assert attribution.SCORING_METHODS == tuple(SCORERS) == BUILT_IN + ("test_weight_norm",)
    assert all(cls.name == name for name, cls in SCORERS.items())
    assert attribution.DEFAULT_MAX_SAMPLES == {"ablation": 512, "conductance": 512, "test_weight_norm": 10}
    with pytest.raises(ValueError, match=r"unknown scoring method 'shap'; allowed methods are \[.*'test_weight_norm'\]$"):
        check_method("shap")
    assert check_method("test_weight_norm") == "test_weight_norm"


def test_a_user_registered_scorer_works_through_channel_scores(trained_model, class3_dm, user_scorer):
    scores = channel_scores(trained_model, class3_dm.forget_dataloader(), "test_weight_norm", layers=["conv2", "fc2"])
    assert scores.method == "test_weight_norm" and scores.num_samples == 10  # its default_max_samples
    torch.testing.assert_close(scores["fc2"], trained_model.fc2.weight.detach().norm(dim=1))
    torch.testing.assert_close(scores["conv2"], trained_model.conv2.weight.detach().flatten(1).norm(dim=1))
    contrast = channel_scores(
        trained_model, class3_dm.forget_dataloader(), "test_weight_norm", retain_loader=class3_dm.retain_dataloader()
    )
    assert all(torch.equal(v, torch.zeros_like(v)) for v in contrast.values())  # the data plays no part


def test_register_scorer_refuses_a_taken_name_or_a_non_scorer(user_scorer):
    with pytest.raises(ValueError, match=r"scorer name 'test_weight_norm' is empty or taken"):
        register_scorer(type("Again", (WeightNorm,), {}))
    with pytest.raises(ValueError, match="expects a ChannelScorer subclass"):
        register_scorer(dict)
    assert SCORERS["test_weight_norm"] is WeightNorm


def test_the_deprecated_methods_alias_is_gone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attribution.SCORING_METHODS == SCORING_METHODS
    for name in ("METHODS", "NOPE"):
        with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
            getattr(attribution, name)


def test_a_scorer_class_or_instance_works_like_its_name(trained_model, class3_dm):
    """channel_scores and the settings take a method name, a ChannelScorer subclass (registered or not) or an
    instance built on the model; all three give the same scores."""
    from lightning_unlearn import UnlearnConfig
    from lightning_unlearn.scoring import GradientXActivation, discover_layers

    loader = class3_dm.forget_dataloader()
    by_name = channel_scores(trained_model, loader, "grad_x_act")
    by_class = channel_scores(trained_model, loader, GradientXActivation)
    layers = list(discover_layers(trained_model, next(iter(loader))[0][:2]))
    modules = dict(trained_model.named_modules())
    by_instance = channel_scores(trained_model, loader, GradientXActivation(trained_model, [modules[n] for n in layers]))
    for other in (by_class, by_instance):
        assert list(other) == list(by_name) and all(torch.equal(other[k], by_name[k]) for k in by_name)
    unregistered = type("Unregistered", (WeightNorm,), {"name": "not_registered"})
    assert channel_scores(trained_model, loader, unregistered, layers=["fc2"]).method == "not_registered"
    assert UnlearnConfig(method=GradientXActivation).to_dict()["method"] == "grad_x_act"
    with pytest.raises(ValueError, match="method must be a scoring method name or a ChannelScorer"):
        UnlearnConfig(method=3)


def test_discovers_layers_head_and_batchnorm(trained_model, digits):
    info = discover_layers(trained_model, digits[0].tensors[0][:2])
    assert list(info) == ["conv1", "conv2", "fc1", "fc2"]
    assert info["conv1"].batchnorm == "bn1" and info["conv2"].batchnorm == "bn2"
    assert info["fc1"].batchnorm is None
    assert [n for n, i in info.items() if i.is_head] == ["fc2"]
    assert info["conv2"].out_channels == 32


@pytest.mark.parametrize("method", SCORING_METHODS)
def test_every_method_returns_finite_scores_of_the_right_shape(trained_model, class3_dm, method):
    scores = channel_scores(trained_model, class3_dm.forget_dataloader(), method, max_samples=64)
    assert {k: v.shape for k, v in scores.items()} == {
        "conv1": (16,), "conv2": (32,), "fc1": (64,), "fc2": (10,)
    }
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in scores.values())
    assert scores.num_samples == 64 and scores.method == method


def test_fast_ablation_equals_captum_layer_feature_ablation(trained_model, class3_dm):
    x, y = next(iter(class3_dm.forget_dataloader()))
    x, y = x[:32], y[:32]
    ours = channel_scores(trained_model, [(x, y)], "ablation")
    for name in ("conv1", "conv2", "fc1"):
        reference = captum_ablation_scores(trained_model, dict(trained_model.named_modules())[name], x, y)
        torch.testing.assert_close(ours[name], reference.float(), rtol=1e-4, atol=1e-5)


def test_ablation_falls_back_when_a_residual_crosses_the_layer():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(x + torch.relu(self.inner(x)))

    torch.manual_seed(0)
    model = Residual().eval()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    ours = channel_scores(model, [(x, y)], "ablation", layers=["inner"])
    torch.testing.assert_close(ours["inner"], captum_ablation_scores(model, model.inner, x, y).float())


def test_top_scored_channels_matter_more_than_random_ones(trained_model, class3_dm):
    """Zeroing the top-scored conv2 channels lowers the class-3 logit more than zeroing random ones."""
    scores = channel_scores(trained_model, class3_dm.forget_dataloader(), "ablation")
    x, _ = next(iter(class3_dm.forget_dataloader()))

    def logit_after_zeroing(channels):
        def hook(_, __, out):
            out = out.clone()
            out[:, channels] = 0
            return out

        h = trained_model.conv2.register_forward_hook(hook)
        with torch.no_grad():
            value = trained_model(x)[:, 3].mean().item()
        h.remove()
        return value

    k = 4
    top = torch.topk(scores["conv2"], k).indices.tolist()
    generator = torch.Generator().manual_seed(0)
    random_drops = [logit_after_zeroing(torch.randperm(32, generator=generator)[:k].tolist()) for _ in range(10)]
    assert logit_after_zeroing(top) < min(random_drops)


def test_contrast_subtracts_retain_importance(trained_model, class3_dm):
    plain = channel_scores(trained_model, class3_dm.forget_dataloader(), "grad_x_act")
    retain = channel_scores(trained_model, class3_dm.retain_dataloader(), "grad_x_act", max_samples=plain.num_samples, seed=1)
    contrast = channel_scores(
        trained_model, class3_dm.forget_dataloader(), "grad_x_act", retain_loader=class3_dm.retain_dataloader()
    )
    torch.testing.assert_close(contrast["fc2"], plain["fc2"] - retain["fc2"], rtol=1e-4, atol=1e-5)


def test_subsample_is_seeded(trained_model, class3_dm):
    a = channel_scores(trained_model, class3_dm.forget_dataloader(), "grad_x_act", max_samples=20, seed=3)
    b = channel_scores(trained_model, class3_dm.forget_dataloader(), "grad_x_act", max_samples=20, seed=3)
    c = channel_scores(trained_model, class3_dm.forget_dataloader(), "grad_x_act", max_samples=20, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_scoring_leaves_the_model_in_its_mode_and_unchanged(trained_model, class3_dm):
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    trained_model.train()
    channel_scores(trained_model, class3_dm.forget_dataloader(), "weight_saliency")
    assert trained_model.training
    assert all(torch.equal(before[k], v) for k, v in trained_model.state_dict().items())


def test_bad_scoring_input(trained_model, class3_dm):
    with pytest.raises(ValueError, match=r"unknown scoring method 'shap'; allowed methods are \['grad_x_act'"):
        channel_scores(trained_model, class3_dm.forget_dataloader(), "shap")
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['conv9'\]; scorable layers are"):
        channel_scores(trained_model, class3_dm.forget_dataloader(), layers=["conv9"])
    with pytest.raises(ValueError, match="has no Conv1d/Conv2d/Conv3d/Linear layer"):
        channel_scores(nn.Sequential(nn.Flatten(), nn.ReLU()), [(torch.zeros(2, 4), torch.zeros(2).long())])
    with pytest.raises(ValueError, match="conductance n_steps must be an integer >= 1, got 0"):
        channel_scores(trained_model, class3_dm.forget_dataloader(), "conductance", conductance_steps=0)
