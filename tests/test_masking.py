"""Invariant 1 (exact freeze): every element outside the mask stays bit-for-bit, whatever the optimizer."""
import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_unlearn.mask import MaskEnforcer, select_channels
from lightning_unlearn.scoring import channel_scores
from lightning_unlearn._training import fit
from lightning_unlearn.callbacks import GradientMask, SelectiveUnlearning
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import SmallCNN

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=0.01),
}


class AnyOptimizer(SmallCNN):
    def __init__(self, make_optimizer):
        super().__init__()
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def _masked_model(trained_model, class3_dm, make_optimizer):
    model = AnyOptimizer(make_optimizer)
    model.load_state_dict(trained_model.state_dict())
    scores = channel_scores(model, class3_dm.forget_dataloader(), "grad_x_act")
    return model, select_channels(scores, model, ratio=0.1, head_rows=[3])


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_exact(model, before, mask):
    params = dict(model.named_parameters())
    assert frozen_elements_equal(model, before, mask)
    moved = [n for n, p in params.items() if mask.masks[n].any() and not torch.equal(p.detach(), before[n])]
    assert moved, "the selected slices should have been updated"
    for name in ("bn1", "bn2"):
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(getattr(model, name), buf), before[f"{name}.{buf}"])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_frozen_elements_are_bit_exact_for_every_optimizer(trained_model, class3_dm, optimizer):
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS[optimizer])
    before = _snapshot(model)
    fit(model, class3_dm, 1, [GradientMask(mask)], {"limit_train_batches": 6})
    _assert_exact(model, before, mask)


@pytest.mark.parametrize("extra", [{"gradient_clip_val": 0.01}, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
                                   {"precision": "bf16-mixed"}, {"accumulate_grad_batches": 3}])
def test_exact_with_clipping_bf16_and_accumulation(trained_model, class3_dm, extra):
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS["adamw"])
    before = _snapshot(model)
    fit(model, class3_dm, 1, [GradientMask(mask)], {"limit_train_batches": 6, **extra})
    _assert_exact(model, before, mask)


@pytest.mark.parametrize("optimizer", ["sgd_nesterov_wd", "adamw"])
def test_zeroing_gradients_alone_is_not_enough(trained_model, class3_dm, optimizer):
    """Why restore() exists: with only zeroed gradients, momentum / weight decay move frozen weights."""
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS[optimizer])
    before = _snapshot(model)
    enforcer = MaskEnforcer(model, mask)
    opt = model.configure_optimizers()
    for x, y in list(class3_dm.retain_dataloader())[:4]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        enforcer.zero_frozen_grads()
        opt.step()
    assert not frozen_elements_equal(model, before, mask)
    enforcer.restore()
    assert frozen_elements_equal(model, before, mask)


def test_selected_bn_mode_updates_only_selected_running_stats(trained_model, class3_dm):
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS["adam"])
    before = _snapshot(model)
    fit(model, class3_dm, 1, [GradientMask(mask, bn_stats="selected")], {"limit_train_batches": 4})
    selected = mask.channels["conv2"]
    frozen = [c for c in range(32) if c not in selected]
    assert torch.equal(model.bn2.running_mean[frozen], before["bn2.running_mean"][frozen])
    assert not torch.equal(model.bn2.running_mean[selected], before["bn2.running_mean"][selected])


def test_resume_mid_unlearning_keeps_mask_and_exactness(trained_model, class3_dm, tmp_path):
    original = _snapshot(trained_model)
    first = SelectiveUnlearning(ratio=0.1, log_metrics=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(trained_model, class3_dm, 1, [first, ckpt], {"limit_train_batches": 5, "enable_checkpointing": True})
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any("SelectiveUnlearning" in k for k in saved["callbacks"])

    resumed_model = SmallCNN()
    second = SelectiveUnlearning(ratio=0.5, log_metrics=False)  # a different ratio: the checkpoint's mask must win
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[second])
    trainer.fit(resumed_model, datamodule=class3_dm, ckpt_path=tmp_path / "last.ckpt")
    assert second.mask == first.mask
    assert "scoring" not in second.timings  # restored, not re-scored
    assert frozen_elements_equal(resumed_model, original, first.mask)


def test_mask_that_does_not_match_the_model_fails_before_training(trained_model, class3_dm):
    _, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS["sgd"])
    other = SmallCNN(hidden=32)
    with pytest.raises(ValueError, match="mask shapes do not match the model"):
        fit(other, class3_dm, 1, [GradientMask(mask)], {"limit_train_batches": 1})


def test_gradient_mask_loads_a_mask_file(trained_model, class3_dm, tmp_path):
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS["sgd_momentum"])
    path = str(mask.save(tmp_path / "m.pt"))
    before = _snapshot(model)
    fit(model, class3_dm, 1, [GradientMask(path)], {"limit_train_batches": 3})
    assert frozen_elements_equal(model, before, mask)


@pytest.mark.parametrize("callback", ["gradient_mask", "selective"])
def test_frozen_batchnorm_is_given_back_in_the_mode_it_was_found(trained_model, class3_dm, callback):
    """bn_stats="frozen" holds BatchNorm in eval mode during the fit only: a model trained further afterwards (a
    federation's shared client model, a user's fine-tune) must get train-mode BatchNorm back."""
    model, mask = _masked_model(trained_model, class3_dm, OPTIMIZERS["adam"])
    model.train()
    cb = GradientMask(mask) if callback == "gradient_mask" else SelectiveUnlearning(mask=mask, max_steps=3,
                                                                                    log_metrics=False)
    fit(model, class3_dm, 1, [cb], {"limit_train_batches": 3})
    assert [m.training for m in model.modules()] == [True] * len(list(model.modules()))
