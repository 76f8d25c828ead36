"""SUPREME 0.1.5's SCRUB, SSD, Bad Teacher, UNSIR and JiT as population-harness methods.

Each adapter calls SUPREME's own method function (``supreme.methods.unlearning_methods.<name>``)
with the arguments SUPREME's driver (``supreme/utils/unlearning/unlearn_main.py``) passes it, and
nothing else: every hyper-parameter (epochs, learning rates, optimizers, batch sizes inside the
methods) is SUPREME's default. What this file supplies is the wiring the driver would: a one-device
CPU ``Fabric``, ``fabric.seed_everything`` with the task's seed (SUPREME's ``set_seeds``), the model
wrapped by ``fabric.setup`` as the driver does, and the request's splits as SUPREME's dataloaders
(its ``create_dataloader`` with its default batch size: 64 for class requests, 128 for sample
requests; items in SUPREME's ``(image, empty tensor, label)`` format).

Run only in the peers' environment (``benchmarks/peers/setup.sh``); see ``benchmarks/peers/README.md``:

    OMP_NUM_THREADS=1 benchmarks/peers/.venv/bin/python benchmarks/population.py \\
        --plugin benchmarks/peers/supreme_methods.py --methods supreme_scrub supreme_ssd ...
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from typing import Any, Callable, Iterator

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from supreme.methods.unlearning_methods.bad_teacher import bad_teacher
from supreme.methods.unlearning_methods.jit import jit
from supreme.methods.unlearning_methods.scrub import scrub
from supreme.methods.unlearning_methods.ssd import ssd
from supreme.methods.unlearning_methods.unsir import unsir
from supreme.utils.generic_utils import create_dataloader, set_seeds

from lightning_unlearn._training import reinitialize

#: SUPREME's driver defaults: ``-batch_size`` is 64 for fullclass and 128 for random_ requests;
#: ``distributed_strategy_name`` defaults to "ddp" (on one device its branches are plain ``fabric.setup``).
BATCH_SIZE = {"fullclass": 64, "random_": 128}
STRATEGY = "ddp"


class SupremeView(Dataset):
    """A ``(x, y)`` dataset as SUPREME's datasets return items: ``(image, torch.Tensor([]), label)``.

    ``targets`` lets SUPREME's ``get_classwise_indices`` read labels without loading images (its fast
    path). ``channels=3`` repeats a one-channel image over three channels (UNSIR only, see below).
    """

    def __init__(self, dataset: Dataset, channels: int | None = None) -> None:
        self.dataset, self.channels = dataset, channels
        self.targets = [int(self.dataset[i][1]) for i in range(len(self.dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x = self.dataset[index][0]
        if self.channels is not None and x.shape[0] != self.channels:
            x = x.expand(self.channels, *x.shape[1:])
        return x, torch.Tensor([]), self.targets[index]


class FirstChannel(nn.Module):
    """Feeds a one-channel model the first channel of a three-channel input (no parameters of its own).

    SUPREME's UNSIR draws its error-maximising noise as ``(32, 3, H, W)`` (RGB is hard-coded), so a
    one-channel model cannot take it. Real images reach UNSIR repeated over three channels
    (``SupremeView(channels=3)``), so this module gives the model exactly its own input; on the noise
    the model sees channel 0, and UNSIR's own L2 term on the noise drives the unused channels to zero.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, :1])


@contextlib.contextmanager
def supreme_run(seed: int) -> Iterator[Fabric]:
    """A one-device CPU Fabric seeded as SUPREME seeds a run; SUPREME's prints captured.

    ``SCALENE`` is SUPREME's own switch for ``num_workers=0`` in ``create_dataloader`` (else 8 worker
    processes per loader, which a shared 2-core machine cannot give); it is set only during the call.
    """
    saved = os.environ.get("SCALENE")
    os.environ["SCALENE"] = "1"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
            set_seeds(fabric, seed)
            yield fabric
    except Exception:
        sys.stderr.write(out.getvalue()[-4000:])
        raise
    finally:
        if saved is None:
            os.environ.pop("SCALENE", None)
        else:
            os.environ["SCALENE"] = saved


def strategy_of(task) -> str:
    """SUPREME's ``type_of_unlearning_strategy``: "fullclass" (one class) or "random_" (samples)."""
    request = task.datamodule.request
    if request.kind == "class":
        if len(request.classes) != 1:
            raise ValueError(f"SUPREME's fullclass strategy forgets one class, got classes {list(request.classes)}")
        return "fullclass"
    if request.kind == "sample":
        return "random_"
    raise ValueError(f"SUPREME has no strategy for a {request.kind!r} request; allowed are 'class' and 'sample' requests")


def loaders(fabric: Fabric, task, strategy: str, channels: int | None = None) -> dict[str, Any]:
    """The driver's dataloaders for this request (``prepare_classwise_dataloaders`` + ``fabric.setup_dataloaders``)."""
    dm, batch = task.datamodule, BATCH_SIZE[strategy]
    retain = SupremeView(dm.retain_set, channels)
    forget = SupremeView(dm.forget_set, channels)
    train = SupremeView(dm.train_dataset, channels)
    if strategy == "fullclass":  # test samples of the retained classes
        retain_test = SupremeView(Subset(dm.test_dataset, dm.remaining_test_indices.tolist()), channels)
    else:  # random_: the whole test set
        retain_test = SupremeView(dm.test_dataset, channels)
    made = {
        "retain_train_dataloader": create_dataloader(retain, batch, is_training=True),
        "forget_train_dataloader": create_dataloader(forget, batch, is_training=True),
        "retain_test_dataloader": create_dataloader(retain_test, batch, is_training=False),
        "full_train_dataloader": create_dataloader(ConcatDataset([retain, forget]), batch, is_training=True),
    }
    made = dict(zip(made, fabric.setup_dataloaders(*made.values())))
    made["trainset"] = train
    return made


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under Fabric's wrapper."""
    return model.module if hasattr(model, "module") else model


def _call(task, name: str, method: Callable, needs: tuple[str, ...], extra: Callable | None = None) -> nn.Module:
    strategy = strategy_of(task)
    with supreme_run(task.seed) as fabric:
        data = loaders(fabric, task, strategy)
        kwargs = dict(fabric=fabric, num_gpus=1, wandb_logging_flag=False, type_of_unlearning_strategy=strategy,
                      model=fabric.setup(task.original), model_name=type(task.original).__name__,
                      distributed_strategy_name=STRATEGY, num_labels=task.num_classes)
        if strategy == "fullclass":
            kwargs["forget_label_id"] = int(task.datamodule.request.classes[0])
        kwargs.update({k: data[k] for k in needs})
        if extra is not None:
            kwargs.update(extra(fabric, task))
        result = method(**kwargs)
    model = unwrap(result if isinstance(result, nn.Module) else kwargs["model"])
    if model is not task.original:
        raise RuntimeError(f"SUPREME's {name} returned a different module than the one it was given")
    return model.eval()


# -- the peers -------------------------------------------------------------------------------
def supreme_scrub(task) -> nn.Module:
    """SCRUB (Kurmanji et al. 2023): SUPREME's ``scrub`` at its defaults (10 SGDA epochs, Adam lr 5e-4, wd 0.1,
    3 max-steps epochs on the forget set, KL temperature 2, alpha 0.5, gamma 1, smoothing 0.5)."""
    return _call(task, "scrub", scrub, ("retain_train_dataloader", "forget_train_dataloader"))


def supreme_ssd(task) -> nn.Module:
    """SSD (Foster et al. 2024): SUPREME's ``ssd`` with the driver's choice for datasets outside its table
    (alpha = selection_weighting 10, lambda = dampening_constant 1, for both fullclass and random_)."""
    return _call(task, "ssd", ssd, ("forget_train_dataloader", "full_train_dataloader"),
                 lambda fabric, task: {"dampening_constant": 1, "selection_weighting": 10})


def _random_teacher(fabric: Fabric, task) -> dict[str, nn.Module]:
    """The driver's incompetent teacher: the same network, randomly initialised (no weights loaded), set up for inference."""
    teacher = reinitialize(copy.deepcopy(task.original), task.seed + 1)
    return {"unlearning_teacher": fabric.setup(teacher)}


def supreme_bad_teacher(task) -> nn.Module:
    """Bad Teacher (Chundawat et al. 2023): SUPREME's ``bad_teacher`` at its defaults (1 epoch, Adam lr 1e-4,
    batch 256, KL temperature 1, a random 30% of the retain set)."""
    return _call(task, "bad_teacher", bad_teacher, ("retain_train_dataloader", "forget_train_dataloader"),
                 _random_teacher)


def supreme_unsir(task) -> nn.Module:
    """UNSIR (Tarun et al. 2023): SUPREME's ``unsir`` at its defaults (noise 25 Adam steps lr 0.1 for a class,
    80 noise batches of 32, impair and repair 1 epoch each at Adam lr 1e-4 on up to 500 retain samples per
    class). Class requests only: SUPREME rejects UNSIR for random_ requests. One-channel models get
    :class:`FirstChannel` in front (SUPREME's noise is three-channel); it has no parameters."""
    from supreme.utils.unlearning.unlearn_main import validate_method_compatibility

    strategy = strategy_of(task)
    validate_method_compatibility("unsir", strategy)  # SUPREME's own check: ValueError for random_
    channels = task.datamodule.train_dataset[0][0].shape[0]
    original = task.original
    if channels not in (1, 3):
        raise ValueError(f"UNSIR's noise is 3-channel; inputs with {channels} channels are not supported (allowed: 1, 3)")
    with supreme_run(task.seed) as fabric:
        data = loaders(fabric, task, strategy, channels=3)
        model = original if channels == 3 else FirstChannel(original)
        result = unsir(fabric=fabric, num_gpus=1, wandb_logging_flag=False, type_of_unlearning_strategy=strategy,
                       num_labels=task.num_classes, forget_label_id=int(task.datamodule.request.classes[0]),
                       model=fabric.setup(model), trainset=data["trainset"],
                       retain_train_dataloader=data["retain_train_dataloader"],
                       retain_test_dataloader=data["retain_test_dataloader"],
                       model_name=type(original).__name__, distributed_strategy_name=STRATEGY)
    out = unwrap(result)
    out = out.model if isinstance(out, FirstChannel) else out
    if out is not original:
        raise RuntimeError("SUPREME's unsir returned a different module than the one it was given")
    return out.eval()


def supreme_jit(task) -> nn.Module:
    """JiT (Foster et al. 2024, Lipschitz smoothing around the forget samples): SUPREME's ``jit`` at its defaults
    (1 epoch, 10 noisy copies per image, SGD lr 1e-3, noise std 0.1)."""
    return _call(task, "jit", jit, ("forget_train_dataloader",))


PEERS: dict[str, Callable] = {
    "supreme_scrub": supreme_scrub,
    "supreme_ssd": supreme_ssd,
    "supreme_bad_teacher": supreme_bad_teacher,
    "supreme_unsir": supreme_unsir,
    "supreme_jit": supreme_jit,
}

