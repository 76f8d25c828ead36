"""select_channels -> ParameterMask: ratios, scopes, heads, BatchNorm, persistence, bad input."""
import math

import pytest
import torch

from lightning_unlearn import ParameterMask
from lightning_unlearn.scoring import channel_scores
from lightning_unlearn.mask import select_channels


@pytest.fixture
def scores(trained_model, class3_dm):
    return channel_scores(trained_model, class3_dm.forget_dataloader(), "grad_x_act")


def test_layer_scope_takes_top_k_per_layer_and_brings_whole_channels(trained_model, scores):
    mask = select_channels(scores, trained_model, ratio=0.1)
    assert {k: len(v) for k, v in mask.channels.items()} == {"conv1": 2, "conv2": 4, "fc1": 7}
    top = torch.topk(scores["conv2"], 4).indices.sort().values.tolist()
    assert mask.channels["conv2"] == top
    m = mask.state_dict()
    assert m["conv2.weight"][top].all() and m["conv2.weight"].sum() == 4 * 16 * 9
    assert m["conv2.bias"][top].all() and m["conv2.bias"].sum() == 4
    assert m["bn2.weight"][top].all() and m["bn2.bias"].sum() == 4  # the BatchNorm fed by conv2 follows
    assert m["fc1.weight"].sum() == 7 * 512
    assert not m["fc2.weight"].any()  # the head only on request
    assert m["conv1.weight"].dtype == torch.bool and m["conv1.weight"].shape == trained_model.conv1.weight.shape


def test_head_rows_and_fraction(trained_model, scores):
    mask = select_channels(scores, trained_model, ratio=0.1, head_rows=[3])
    m = mask.state_dict()
    assert m["fc2.weight"][3].all() and m["fc2.weight"].sum() == 64 and m["fc2.bias"].tolist() == [i == 3 for i in range(10)]
    total = sum(p.numel() for p in trained_model.parameters())
    assert mask.fraction == pytest.approx(sum(int(v.sum()) for v in m.values()) / total)
    assert 0 < mask.fraction <= 0.2
    assert mask.layer_fractions()["fc2"] == pytest.approx(65 / 650)


def test_global_scope_and_threshold(trained_model, scores):
    mask = select_channels(scores, trained_model, ratio=0.1, scope="global")
    assert sum(len(v) for v in mask.channels.values()) == math.ceil(0.1 * (16 + 32 + 64))
    everything = select_channels(scores, trained_model, threshold=0.0, include_head=True)
    assert everything.fraction == 1.0
    only_max = select_channels(scores, trained_model, threshold=1.0)
    assert all(len(v) == 1 for v in only_max.channels.values())


def test_mask_saves_loads_and_checks_the_model(trained_model, scores, tmp_path):
    mask = select_channels(scores, trained_model, ratio=0.2, head_rows=[3])
    loaded = ParameterMask.load(mask.save(tmp_path / "mask.pt"))
    assert loaded == mask and loaded.channels == mask.channels
    loaded.check(trained_model)
    from lightning_unlearn.models import SmallCNN

    with pytest.raises(ValueError, match="mask shapes do not match"):
        mask.check(SmallCNN(channels=(8, 32)))
    with pytest.raises(ValueError, match="mask does not match the model"):
        ParameterMask({"conv1.weight": torch.ones(16, 1, 3, 3)}).check(trained_model)


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, "0.1"])
def test_bad_ratio(trained_model, scores, ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        select_channels(scores, trained_model, ratio=ratio)


def test_bad_scope_and_head_rows(trained_model, scores):
    with pytest.raises(ValueError, match=r"unknown scope 'model'; allowed scopes are \['layer', 'global'\]"):
        select_channels(scores, trained_model, scope="model")
    with pytest.raises(ValueError, match=r"head row\(s\) \[10\] out of range"):
        select_channels(scores, trained_model, head_rows=[10])


def test_groupnorm_follows_its_conv_like_batchnorm():
    """DP models swap BatchNorm for GroupNorm: a selected channel still brings its norm's affine parameters."""
    from lightning_unlearn.scoring import discover_layers
    from lightning_unlearn.privacy.models import DPSmallCNN

    model = DPSmallCNN().eval()
    info = discover_layers(model, torch.zeros(2, 1, 8, 8))
    assert info["conv1"].batchnorm == "bn1" and info["conv2"].batchnorm == "bn2"
    x, y = torch.randn(8, 1, 8, 8), torch.full((8,), 3)
    mask = select_channels(channel_scores(model, [(x, y)], "grad_x_act"), model, ratio=0.25)
    assert mask.masks["bn2.weight"][mask.channels["conv2"]].all() and mask.masks["bn2.weight"].sum() == 8
