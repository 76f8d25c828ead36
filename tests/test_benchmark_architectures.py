"""The forgetting benchmark's four architectures work with the library: they train, carry the UnlearningMixin,
and scoring, selection, reset and the masked repair apply to them with every unselected element bit-exact."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lightning_unlearn import ForgetRequest, unlearn
from lightning_unlearn.data import UnlearningDataModule
from lightning_unlearn._training import fit
from lightning_unlearn.scoring import channel_scores, discover_layers
from lightning_unlearn.repair.mixin import UnlearningMixin
from lightning_unlearn.models import ClassifierModule
from lightning_unlearn.reset import reset_selected
from lightning_unlearn.mask import select_channels

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))  # forgetting.py imports its sibling architectures.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


architectures = _load("architectures")
NAMES = list(architectures.ARCHITECTURES)


class _Loader(pl.LightningDataModule):
    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def small_digits(digits):
    """160 training and 60 test digits: every class present, fast enough for ResNet-18 on one thread."""
    train, test = digits
    return Subset(train, list(range(160))), Subset(test, list(range(60)))


@pytest.fixture(scope="module")
def small_dm(small_digits):
    return UnlearningDataModule(*small_digits, ForgetRequest(classes=[3]), batch_size=32, num_classes=10)


def test_the_four_architectures_are_registered():
    assert NAMES == ["SmallCNN", "ResNetBN", "MLP", "ResNet18"]
    with pytest.raises(ValueError, match=r"unknown architecture 'VGG'; allowed architectures are \['SmallCNN'"):
        architectures.build("VGG")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("image_size", [8, 28])
def test_architecture_maps_images_to_logits(name, image_size):
    model = architectures.build(name, num_classes=10, image_size=image_size).eval()
    assert isinstance(model, ClassifierModule) and isinstance(model, UnlearningMixin)
    with torch.no_grad():
        assert model(torch.randn(3, 1, image_size, image_size)).shape == (3, 10)


def test_resnet18_has_torchvision_layout():
    model = architectures.build("ResNet18")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 BasicBlocks x 2 convs, 3 downsampling 1x1 skips
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1) and convs[0].in_channels == 1
    assert sorted({c.out_channels for c in convs}) == [64, 128, 256, 512]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


@pytest.mark.parametrize("name", NAMES)
def test_architecture_trains_and_unlearns_with_unselected_parameters_bit_exact(name, small_digits, small_dm, one_thread):
    pl.seed_everything(0, verbose=False)
    model = architectures.build(name, epochs=1)
    before_training = copy.deepcopy(model.state_dict())
    fit(model, _Loader(small_digits[0]), epochs=1, trainer_kwargs={"limit_train_batches": 2})
    assert any(not torch.equal(p, before_training[n]) for n, p in model.named_parameters()), "no training step happened"

    # layers are discovered (BatchNorm attached where there is one), scored and selected per layer
    layers = discover_layers(model, small_digits[0][0][0][None])
    heads = [n for n, info in layers.items() if info.is_head]
    assert len(heads) == 1 and len(layers) >= 3
    if name != "MLP":
        assert any(info.batchnorm for info in layers.values())
    scores = channel_scores(model, small_dm.forget_dataloader(), layers=list(layers), max_samples=32)
    mask = select_channels(scores, model, ratio=0.1, head_rows=[3])
    assert 0 < mask.fraction < 0.5
    selected = {layer: mask.masks[f"{layer}.weight"].flatten(1).any(1) for layer in layers}
    assert selected[heads[0]].nonzero().flatten().tolist() == [3]  # the forgotten class's row only
    body = {layer: rows for layer, rows in selected.items() if layer != heads[0]}
    counts = {layer: int(rows.sum()) for layer, rows in body.items()}
    assert len(body) >= 2 and all(1 <= counts[layer] < rows.numel() for layer, rows in body.items()), f"{name}: {counts}"

    # reset changes exactly the selected elements
    reset_model = copy.deepcopy(model)
    changed = reset_selected(reset_model, mask, "reinit", seed=0)
    assert changed == mask.num_selected
    for n, p in reset_model.named_parameters():
        assert torch.equal(p[~mask.masks[n]], dict(model.named_parameters())[n][~mask.masks[n]])

    # the library's masked reset + repair moves only the selected elements, whatever the model's optimizer
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    result = unlearn(model, small_dm, mask=mask, max_steps=3, reset="reinit", early_stopping=False)
    moved = False
    for n, p in result.model.named_parameters():
        keep = result.mask.masks[n]
        assert torch.equal(p[~keep], original[n][~keep]), f"{name}: unselected elements of {n} moved"
        moved |= not torch.equal(p[keep], original[n][keep])
    assert moved, f"{name}: no selected element changed"
    for n, b in result.model.named_buffers():
        if n.endswith(("running_mean", "running_var")):
            weight = result.mask.masks[n.rsplit(".", 1)[0] + ".weight"]
            assert torch.equal(b[~weight], buffers[n][~weight]), f"{name}: statistics of unselected channels in {n}"


@pytest.mark.slow
def test_forgetting_benchmark_writes_rows_resumes_and_tabulates(tmp_path, capsys, one_thread):
    """One MLP cell end to end: every planned row is written once, a rerun adds none, the table marks targets."""
    forgetting = _load("forgetting")
    out = tmp_path / "forgetting_digits.json"
    argv = ["--archs", "MLP", "--seeds", "0", "--requests", "class", "--ratios", "0.1", "--epochs", "3",
            "--relearn-max-steps", "20", "--out", str(out)]
    assert forgetting.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["selection"] for r in rows] == ["original", "retrain", "explained", "random", "head_row"]
    unlearned = rows[2:]
    assert all(r["unlearn_seconds"] > 0 and 0 < r["param_fraction"] < 1 and r["steps"] >= 1 for r in unlearned)
    assert unlearned[0]["param_fraction"] == pytest.approx(unlearned[1]["param_fraction"])  # same budget, random channels
    assert rows[1]["retrain_seconds"] > 0 and rows[1]["param_fraction"] == 1.0
    assert forgetting.main(argv) == 0
    assert len(json.loads(out.read_text())["rows"]) == len(rows)  # resumed: nothing recomputed
    capsys.readouterr()
    assert forgetting.main(["--table", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### digits, class 3" in text and "| MLP | **retrain** |" in text
    assert text.count("✓") + text.count("✗") == 3  # one verdict per unlearned row


def test_forgetting_targets_verdict():
    forgetting = _load("forgetting")
    within = {k: (0.005, 0.0, 3) for k in ("forget_acc", "remaining_acc", "test_acc")}
    assert forgetting._targets(within, (50.0, 0.0, 3), (40.0, 0.0, 3), "class") == "✓"
    assert forgetting._targets(within, (30.0, 0.0, 3), (40.0, 0.0, 3), "class") == "✗ relearn"
    assert forgetting._targets({**within, "test_acc": (0.02, 0.0, 3)}, None, None, "samples") == "✗ test"


def test_forgetting_rejects_bad_ratio(capsys):
    forgetting = _load("forgetting")
    with pytest.raises(SystemExit) as exit_info:
        forgetting.parse_args(["--ratios", "0", "0.1"])
    assert exit_info.value.code == 2 and "ratios must be in (0, 1], got [0.0]" in capsys.readouterr().err
