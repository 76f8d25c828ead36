"""How the head calibration's initial row decides the forgotten logit (class requests), as a population plugin.

The retain data never moves a re-initialised head row along the direction only the forgotten class's features
occupy, so the random draw's component there stays. The library's ``calibrate_head`` on the original (body
untouched), 10 epochs of Adam lr 1e-3 (``calibrate_epochs='auto'`` without the original's epochs), from three
starts, three seeds each: the plain draw, the draw made orthogonal to the class's mean forget feature, and the
draw whose positive component is reflected (the library's rule); plus the library default with one fixed seed for
every member (``library_seed1``, ``library_seed2``; the page's ``default`` is seed 0)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/population.py --plugin benchmarks/population_init.py \\
        --datasets digits --archs SmallCNN SmallCNN-GN ResNetBN --requests class3 --methods draw draw_s2 \\
        draw_s3 orthogonal orthogonal_s2 orthogonal_s3 reflected reflected_s2 reflected_s3 library_seed1 \\
        library_seed2 --out-suffix _init
"""
from __future__ import annotations

import functools
from typing import Callable
from unittest import mock

import torch
from torch import Tensor, nn

from lightning_unlearn import UnlearnConfig, unlearn
from lightning_unlearn.repair import calibration
from population_methods import default, head_layer
from population_task import Method, Task


def _orthogonal(weight: Tensor, rows, features: Tensor, labels: Tensor) -> None:
    for i, row in enumerate(rows):
        u = features[labels == row].mean(0)
        weight[i] -= (weight[i] @ u) / (u @ u) * u


RULES: dict[str, Callable[..., None]] = {
    "draw": lambda weight, rows, features, labels: None,
    "orthogonal": _orthogonal,
    "reflected": calibration._not_favouring_forget_means,
}


def _start(rule: str, name: str) -> Method:
    def method(task: Task) -> nn.Module:
        model, dm = task.original, task.datamodule
        head = head_layer(model)
        head_name = next(n for n, m in model.named_modules() if m is head)
        adam = functools.partial(torch.optim.Adam, lr=1e-3)
        loader = dm.retain_dataloader(shuffle=False)
        with mock.patch.object(calibration, "_not_favouring_forget_means", RULES[rule]):
            calibration.calibrate_head(model, loader, list(dm.request.classes), head_name, adam, 10 * len(loader),
                                       task.seed, forget_loader=dm.forget_dataloader(shuffle=False))
        return model.eval()
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"calibrate_head alone from the {rule} start, 10 epochs of Adam (a name of its own: its seeds)"
    method.fingerprint = default.fingerprint + rule
    return method


def _library_seed(seed: int) -> Method:
    def method(task: Task) -> nn.Module:
        torch.manual_seed(task.seed)
        return unlearn(task.original, task.datamodule, UnlearnConfig(seed=seed), inplace=True).model.eval()
    method.__name__ = method.__qualname__ = f"library_seed{seed}"
    method.__doc__ = f"The library default with seed={seed} for every member."
    method.fingerprint = default.fingerprint
    return method


PEERS: dict[str, Method] = {
    **{f"{rule}{suffix}": _start(rule, f"{rule}{suffix}") for rule in RULES for suffix in ("", "_s2", "_s3")},
    **{f"library_seed{s}": _library_seed(s) for s in (1, 2)},
}


# -- the page ------------------------------------------------------------------------------------------------------
def render_page(results=None) -> str:
    """One table per start rule: each cell's three seeds (forget accuracy, mean forgotten confidence, raw / cal
    U-LiRA), then the library default at seeds 0 (the population page's row), 1 and 2."""
    import json
    from pathlib import Path

    import pagekit
    from population import RESULTS

    results = Path(results or RESULTS)
    _, cells, out = pagekit.cells_page(
        results, "population_*_class3_init.json", "Where the head calibration starts", "population_init.py",
        "The head calibration re-initialises the forgotten class's head row and fits it on retain features. The "
        "retain data never moves the row along the direction only the forgotten class's features occupy, so the "
        "random draw's component there stays, and decides how far the forgotten logit falls on the forgotten data. "
        "Below, `calibrate_head` alone on each original (body untouched, 10 epochs of Adam, K = 8 per population) "
        "from three starts, each with three seeds: the plain draw, the draw made orthogonal to the class's mean "
        "forget feature, and the draw whose positive component is reflected to the same size, negative (the "
        "library's rule: a row may not start out favouring the class it must forget). Columns: forget accuracy "
        "(%), mean logit-scaled confidence on the forget data (retrained: the first row of each cell), U-LiRA raw / "
        "class-calibrated AUC against the retrained population ([population page](population.md)).")
    for res in cells:
        rows = {r["method"]: r for r in res["rows"]}
        page = json.loads((results / f"population_{res['dataset']}_{res['architecture']}_class3.json").read_text())
        default = next((r for r in page["rows"] if r["method"] == "default"), None)
        retrained = rows.get("retrained (two halves)", {})
        out += [f"## {res['dataset']} / {res['architecture']} / class 3", "",
                f"Retrained: mean confidence {retrained.get('confidence', float('nan')):+.1f}, two halves "
                f"{retrained.get('ulira_raw', float('nan')):.3f} / {retrained.get('ulira_cal', float('nan')):.3f}.", "",
                "| start | seed 1 | seed 2 | seed 3 |", "|---|---|---|---|"]
        for rule in ("draw", "orthogonal", "reflected"):
            cols = [rows.get(f"{rule}{s}") for s in ("", "_s2", "_s3")]
            out.append(f"| {rule} | " + " | ".join(_cell(r) for r in cols) + " |")
        lib = [default, rows.get("library_seed1"), rows.get("library_seed2")]
        out += ["", "| library default (all members one seed) | seed 0 | seed 1 | seed 2 |", "|---|---|---|---|",
                "| `unlearn()` | " + " | ".join(_cell(r) for r in lib) + " |", ""]
    return pagekit.finish(out)


def _cell(row) -> str:
    if row is None:
        return "-"
    return (f"{100 * row['forget_acc']:.1f}% / {row['confidence']:+.1f} / "
            f"{row['ulira_raw']:.3f} / {row['ulira_cal']:.3f}")
