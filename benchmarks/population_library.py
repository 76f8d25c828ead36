"""The library's pluggable steps in the population harness (issue 22): ``unlearn()`` with the head calibration or the
held-out objective, as the library runs them (score, select, reset, masked repair, exact freeze).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py --plugin benchmarks/population_library.py \\
        --datasets digits --archs SmallCNN --requests class3 --methods lib_headcal lib_headcal_noreset --out-suffix _library

Class methods need a class request (``calibrate="head"`` refuses a sample request before any work).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lightning_unlearn import UnlearnConfig, unlearn
from population_task import Method, Task


def _library(**settings: Any) -> Callable[[Task], UnlearnConfig]:
    def config(task: Task) -> UnlearnConfig:
        return UnlearnConfig(seed=task.seed, **settings)
    return config


def _head_only(task: Task) -> UnlearnConfig:
    head = [n for n, m in task.original.named_modules() if isinstance(m, nn.Linear)][-1]
    return UnlearnConfig(seed=task.seed, layers=[head], reset="none", objective="retain")


def _method(name: str, doc: str, make: Callable[[Task], UnlearnConfig], calibrate: bool = False) -> Method:
    def method(task: Task) -> nn.Module:
        torch.manual_seed(task.seed)
        config = make(task)
        if calibrate:  # the original's schedule, as the CLI reads it from the checkpoint
            config = UnlearnConfig.build(config, calibrate="head", calibrate_epochs=int(task.recipe["epochs"]))
        return unlearn(task.original, task.datamodule, config, inplace=True).model.eval()
    method.__name__ = method.__qualname__ = name
    method.__doc__ = doc
    method.fingerprint = _sources()  # the library's code and this file decide the result
    return method


def _sources() -> str:
    import lightning_unlearn

    root = Path(lightning_unlearn.__file__).parent
    return Path(__file__).read_text() + "".join(f.read_text() for f in sorted(root.rglob("*.py")))


def m_headfit_reseeded(task: Task) -> nn.Module:
    """Control: population_methods.head_fit itself under another name, so its members get other derived seeds (the
    harness derives each member's seed from the method's name): how much of a row's U-LiRA is the seeds' luck."""
    from population_methods import head_fit

    return head_fit(task)


PEERS: dict[str, Method] = {
    "m_headfit_reseeded": m_headfit_reseeded,
    # class requests: the head calibration after the library's repair
    "lib_headcal": _method("lib_headcal", "Defaults + calibrate='head' (original's epochs).", _library(), True),
    "lib_headcal_noreset": _method(
        "lib_headcal_noreset", "reset='none', objective='retain' + calibrate='head': the body barely moves.",
        _library(reset="none", objective="retain"), True),
    "lib_headcal_headonly": _method(
        "lib_headcal_headonly", "Only the head scored and selected (layers=[head]), reset='none', objective='retain' "
        "+ calibrate='head': the body stays bit-for-bit the original's.", _head_only, True),
    # sample requests: the held-out target on the mask (default ratio) and on the whole model
    "lib_heldout": _method("lib_heldout", "objective='heldout', other settings default.", _library(objective="heldout")),
    "lib_heldout_noreset": _method(
        "lib_heldout_noreset", "objective='heldout', reset='none', the stopping rule on.",
        _library(objective="heldout", reset="none")),
    "lib_heldout_nostop": _method(
        "lib_heldout_nostop", "objective='heldout', reset='none', the whole auto budget (no early stop).",
        _library(objective="heldout", reset="none", early_stopping=False)),
    "lib_heldout_ratio1": _method(
        "lib_heldout_ratio1", "objective='heldout', ratio=1.0, reset='none', the whole auto budget.",
        _library(objective="heldout", ratio=1.0, reset="none", early_stopping=False)),
}
