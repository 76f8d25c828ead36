"""UnlearnConfig: one settings object, validated once, and every CLI option reaches the engine that runs it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lightning_unlearn import ForgetRequest, UnlearnConfig
from lightning_unlearn.cli import main
from lightning_unlearn.config import AUTO, field_names
from lightning_unlearn.models import SmallCNN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: A non-default value for every field, as the CLI takes it and as the engine must receive it.
CLI_VALUES = {
    "method": ("ablation", "ablation"),
    "ratio": ("0.25", 0.25),
    "scope": ("global", "global"),
    "threshold": ("0.5", 0.5),
    "contrast": ("true", True),
    "max_samples": ("33", 33),
    "layers": ("[conv1,fc2]", ["conv1", "fc2"]),
    "include_head": ("true", True),
    "head_rows": ("[1,2]", [1, 2]),
    "objective": ("ascent", "ascent"),
    "forget_weight": ("0.5", 0.5),
    "epochs": ("3", 3),
    "max_steps": ("7", 7),
    "lr_scale": ("2.0", 2.0),
    "head_lr_scale": ("5.0", 5.0),
    "bn_stats": ("selected", "selected"),
    "early_stopping": ("false", False),
    "stop_tolerance": ("0.05", 0.05),
    "patience": ("7", 7),
    "check_every": ("4", 4),
    "check_samples": ("100", 100),
    "reset": ("reinit", "reinit"),
    "seed": ("11", 11),
    "calibrate": ("head", "head"),
    "calibrate_epochs": ("3", 3),
}


def test_every_field_has_a_cli_value_in_this_test():
    assert sorted(CLI_VALUES) == sorted(field_names())
    for name, (_, expected) in CLI_VALUES.items():
        assert getattr(UnlearnConfig(), name) != expected, f"{name}: pick a non-default value"


def test_defaults_live_in_one_place_and_auto_resolves_per_engine():
    class3, sample = ForgetRequest(classes=[3]), ForgetRequest(sample_ids=[1, 2])
    central, federated = UnlearnConfig().resolved(class3, "central"), UnlearnConfig().resolved(class3, "federated")
    assert (central.objective, central.head_lr_scale) == (AUTO["central"]["class"]["objective"], AUTO["central"]["head_lr_scale"])
    assert (central.reset, central.calibrate) == (AUTO["central"]["class"]["reset"], AUTO["central"]["class"]["calibrate"])
    assert UnlearnConfig().reset == "auto" and (central.reset, federated.reset) == ("none", "none")  # today's defaults
    assert UnlearnConfig().resolved(sample, "federated").reset == "none"  # as centrally
    assert UnlearnConfig().resolved(ForgetRequest(clients=[1]), "federated").reset == "dampen"
    assert UnlearnConfig().resolved(ForgetRequest(clients=[1]), "central").reset == "none"
    assert (central.objective, central.calibrate, federated.calibrate) == ("retain", "head", "head")
    assert UnlearnConfig().resolved(sample, "federated").calibrate == "none"
    central_sample = UnlearnConfig().resolved(sample, "central")
    assert (central_sample.objective, central_sample.reset, central_sample.calibrate) == ("heldout", "none", "none")
    assert (federated.objective, federated.head_lr_scale) == ("retain", 10.0)
    assert central.head_rows == [3] and UnlearnConfig().resolved(sample).head_rows is None
    explicit = UnlearnConfig(objective="ascent", head_rows=[1], head_lr_scale=None).resolved(class3, "federated")
    assert (explicit.objective, explicit.head_rows, explicit.head_lr_scale) == ("ascent", [1], None)
    assert (federated.reset, federated.epochs, federated.max_steps) == ("none", 1, None)  # one local epoch per round
    with pytest.raises(ValueError, match=r"unknown engine 'flower'; allowed values are \['central', 'federated'\]"):
        UnlearnConfig().resolved(class3, "flower")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ratio": float("nan")}, r"ratio must be in \(0, 1\], got nan"),
        ({"ratio": True}, r"ratio must be in \(0, 1\], got True"),
        ({"threshold": 1.5}, r"threshold must be a finite number >= 0 and <= 1, got 1.5"),
        ({"epochs": 0}, r"epochs must be an integer >= 1 or None, got 0"),
        ({"epochs": -1}, r"epochs must be an integer >= 1 or None, got -1"),
        ({"max_steps": 2.5}, r"max_steps must be an integer >= 1, 'auto' or None, got 2.5"),
        ({"forget_weight": -0.1}, r"forget_weight must be a finite number >= 0, got -0.1"),
        ({"lr_scale": 0}, r"lr_scale must be a finite number > 0, got 0"),
        ({"head_rows": [-1]}, r"head_rows must be 'auto', None or a list of row indices >= 0, got \[-1\]"),
        ({"layers": "conv1"}, r"layers must be a non-empty list of layer names or None, got 'conv1'"),
        ({"method": "shap"}, r"unknown scoring method 'shap'; allowed methods are \['grad_x_act'"),
        ({"calibrate": "probe"}, r"unknown calibrate 'probe'; allowed values are \['auto', 'head', 'none'\]"),
        ({"calibrate_epochs": 0}, r"calibrate_epochs must be an integer >= 1, got 0"),
        ({"objective": "distill"}, r"unknown objective 'distill'; allowed values are \['auto', 'random_label', 'ascent', 'retain', 'heldout'\]"),
        ({"ratoi": 0.2}, r"unknown unlearning setting\(s\) \['ratoi'\]; allowed settings are \['method', 'ratio'"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        UnlearnConfig.build(**overrides)


def test_build_merges_a_config_a_mapping_and_overrides():
    base = UnlearnConfig(ratio=0.3, seed=4)
    assert UnlearnConfig.build(base, seed=5) == UnlearnConfig(ratio=0.3, seed=5)
    assert UnlearnConfig.build({"ratio": 0.3}) == UnlearnConfig(ratio=0.3)
    assert UnlearnConfig.build(None) == UnlearnConfig()
    assert UnlearnConfig(**UnlearnConfig(ratio=0.2).to_dict()) == UnlearnConfig(ratio=0.2)


# -- the CLI: every option reaches the engine, central and federated -------------------------------------------
class _Reached(Exception):
    """Raised by the spies once the engine has received its settings: no training is needed to check them."""


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """LightningCLI writes config.yaml into the working directory when no logger is set: keep it in tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "original.ckpt"
    torch.save({"state_dict": SmallCNN().state_dict()}, path)
    return path


def _cli_args(config: str, checkpoint: Path, tmp_path: Path) -> list[str]:
    args = ["unlearn", "--config", str(CONFIGS / config), "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path),
            "--trainer.logger", "false", "--federated.output_dir", str(tmp_path / "fed")]
    for name, (text, _) in CLI_VALUES.items():
        args += [f"--unlearning.{name}", text]
    return args


def _assert_every_value(config: UnlearnConfig) -> None:
    received = dataclasses.asdict(config)
    assert {k: received[k] for k in CLI_VALUES} == {k: v for k, (_, v) in CLI_VALUES.items()}


def test_every_cli_option_reaches_the_central_engine(monkeypatch, checkpoint, tmp_path):
    import lightning_unlearn.commands as commands

    seen = {}

    class Spy(commands.SelectiveUnlearning):
        def __init__(self, config, **kwargs):
            super().__init__(config, **kwargs)
            seen["config"] = self.config
            raise _Reached

    monkeypatch.setattr(commands, "SelectiveUnlearning", Spy)
    with pytest.raises(_Reached):
        main(_cli_args("digits_cnn.yaml", checkpoint, tmp_path))
    _assert_every_value(seen["config"])


def test_every_cli_option_reaches_the_federated_engine(monkeypatch, checkpoint, tmp_path):
    import lightning_unlearn.commands as commands

    seen = {}

    def spy(model, clients, request, config=None, **kwargs):
        seen["config"], seen["rounds"] = config, kwargs.get("rounds")
        raise _Reached

    monkeypatch.setattr(commands, "federated_unlearn", spy)
    with pytest.raises(_Reached):
        main(_cli_args("digits_fed.yaml", checkpoint, tmp_path) + ["--federated.unlearn_rounds", "2"])
    _assert_every_value(seen["config"])
    assert seen["rounds"] == 2



@pytest.mark.parametrize("flag, value, message", [
    ("--unlearning.epochs", "-1", "epochs must be an integer >= 1 or None, got -1"),
    ("--unlearning.ratio", "nan", "unlearning.ratio: expected float, got 'nan'"),
    ("--unlearning.epochs", "two", "unlearning.epochs: expected NoneType or int, got 'two'"),
    ("--unlearning.max_stpes", "3", "max_stpes"),
])
def test_bad_cli_values_end_in_one_line_naming_them(flag, value, message, checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["unlearn", "--config", str(CONFIGS / "digits_cnn.yaml"), "--ckpt_path", str(checkpoint),
              "--trainer.logger", "false", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err



def test_federated_engine_builds_the_oracle_view_from_the_original_when_nothing_ran():
    """`evaluate --retrained_path` on a federated config: no unlearning or retraining ran, the splits still exist."""
    from lightning_unlearn.commands import FederatedEngine
    from lightning_unlearn.data.presets import FederatedDigitsData
    from lightning_unlearn.federated.runner import FederatedSettings

    fdm = FederatedDigitsData(num_clients=3, forget_clients=[1])
    engine = FederatedEngine(FederatedSettings(rounds=1), seed=0)
    with pytest.raises(RuntimeError, match="federation is built by unlearn"):
        engine.evaluation_datamodule(fdm)
    dm = engine.evaluation_datamodule(fdm, SmallCNN())
    assert sorted(dm.forget_indices.tolist()) == sorted(fdm.client_indices(1).tolist())
