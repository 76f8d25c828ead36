"""The evidence-against-share curve of the population harness: U-LiRA (raw and class-calibrated) of the class-request
candidates against the share of parameter elements each one may change, from the committed population JSONs.

The JSONs do not record the share, so it is counted here on a freshly built model of the cell's architecture (no
training: the count depends on the architecture and the method's selection rule, not on the weights):

- ``headfit``: the forgotten class's head row (weight row and bias);
- ``gradmask_<r>_headfit_b6``: ``r`` of each module's output channels (``population_methods.channel_masks``: a
  channel owns row c of every parameter of its module, norm layers included), plus the forgotten head row, counted
  once (the distillation's gradient on the head sits on the forgotten row, so the masked head row is that row);
- ``distill_headfit_b6``: the whole model;
- ``default``: the library's own mask at its defaults (``UnlearnConfig().resolved(request)`` through
  ``orchestration.prepare``: the top ``ratio`` of channels of every Conv/Linear layer with the BatchNorm they feed,
  plus the forgotten head row).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The methods on the curve, in order of the share they update, with their labels on the page.
METHODS = {
    "headfit": "head row only (headfit)",
    "default": "library default",
    "gradmask_10_headfit_b6": "10% gradient-scored channels + head fit",
    "gradmask_30_headfit_b6": "30% gradient-scored channels + head fit",
    "distill_headfit_b6": "whole model + head fit",
}
HALVES = "retrained (two halves)"
FIGURE = "population_fraction_curve.png"
FORGOTTEN = 3  # the harness's class request forgets class 3


def row(cell: dict[str, Any], method: str) -> dict[str, Any]:
    """The cell's row of ``method`` ({} when the cell has none)."""
    return next((r for r in cell["rows"] if r["method"] == method), {})


def band(cell: dict[str, Any]) -> list[dict[str, Any]]:
    """The schedule band's rows: honest retraining with half and with double the original's schedule."""
    return [r for r in cell["rows"] if r["method"].startswith(("retrain, half", "retrain, double"))]


def curve_cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Class-request cells that have the masked rows (at least ``gradmask_10_headfit_b6``)."""
    return [c for c in results if c["request"].startswith("class") and row(c, "gradmask_10_headfit_b6")]


def _model(arch: str, dataset: str) -> nn.Module:
    import population

    spec = population.DATASETS[dataset]
    torch.manual_seed(0)
    return population.ARCHS[arch](num_classes=10, image_size=spec.image_size, epochs=spec.epochs)


def _head_row(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from population_methods import head_layer

    head = head_layer(model)
    name = next(n for n, m in model.named_modules() if m is head)
    for pname in ("weight", "bias"):
        key = f"{name}.{pname}"
        if key in masks:
            masks[key][FORGOTTEN] = True
    return masks


def _library_mask(model: nn.Module, image_size: int) -> dict[str, torch.Tensor]:
    from lightning_unlearn import ForgetRequest, UnlearnConfig
    from lightning_unlearn.orchestration import prepare
    from lightning_unlearn.scoring.layers import discover_layers

    layers = discover_layers(model, torch.zeros(1, 1, image_size, image_size))
    config = UnlearnConfig().resolved(ForgetRequest(classes=[FORGOTTEN]))
    scores = {n: torch.zeros(i.out_channels) for n, i in layers.items()}
    return dict(prepare(model, scores, config, layers=layers).masks)


def shares(arch: str, dataset: str) -> dict[str, float]:
    """Method -> share of the model's parameter elements it may change (counted on a fresh model, see above)."""
    from population_methods import channel_masks, head_layer

    model = _model(arch, dataset)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    head = head_layer(model)
    out = {"headfit": (head.in_features + (head.bias is not None)) / total, "distill_headfit_b6": 1.0}
    for ratio in (10, 30):
        # scores that put the head's chosen row on the forgotten class (where the distillation's head gradient is)
        scores = {n: torch.zeros_like(p) for n, p in params.items()}
        for n, p in params.items():
            if p is head.weight or p is head.bias:
                scores[n][FORGOTTEN] = 1.0
        masks = _head_row(model, channel_masks(model, scores, ratio / 100))
        out[f"gradmask_{ratio}_headfit_b6"] = sum(int(m.sum()) for m in masks.values()) / total
    image_size = 8 if dataset == "digits" else 28
    out["default"] = sum(int(m.sum()) for m in _library_mask(model, image_size).values()) / total
    return out


def points(cell: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(method, share, raw, cal) of the curve's methods present in ``cell``, by share."""
    share = shares(cell["architecture"], cell["dataset"])
    found = [(m, share[m], row(cell, m)["ulira_raw"], row(cell, m)["ulira_cal"]) for m in METHODS if row(cell, m)]
    return sorted(found, key=lambda p: p[1])


def _name(cell: dict[str, Any]) -> str:
    return f"{cell['dataset']} / {cell['architecture']} / {cell['request']}"


def section(results: list[dict[str, Any]]) -> list[str]:
    """The page's section: the figure and a table of the same numbers."""
    from population import _fmt

    cells = curve_cells(results)
    if not cells:
        return []
    lines = ["## Evidence against the share of parameters updated", "",
             f"![U-LiRA against the share of parameters updated]({FIGURE})", "",
             "Class requests, the cells that have the masked rows. Each point is a method's U-LiRA AUC (top: raw, "
             "bottom: class-calibrated) against the share of the model's parameter elements it may change; the line "
             "joins the methods that end with the head-row fit, the library default (no head fit) stands apart; the "
             "dotted line is the attack's floor (two halves of the retrained population), the grey band the "
             "schedule band (honest retraining with half and double the schedule), the dashed line the original. "
             "The results files do not record the shares: they are counted on a freshly built model of each "
             "architecture (`benchmarks/population_curve.py` says how for each method; the count depends on the "
             "architecture and the selection rule, not on the weights). The gradient-scored masks count the "
             "forgotten head row once. The figure is written with the page by `python benchmarks/render_all.py`; "
             "the docs check compares this table, not the PNG's bytes.", ""]
    rows = []
    for cell in cells:
        halves, sched = row(cell, HALVES), band(cell)
        for method, share, raw, cal in points(cell):
            rows.append([_name(cell), METHODS[method], f"{100 * share:.2f}", _fmt(raw, "f3"), _fmt(cal, "f3")])
        rows.append([_name(cell), f"*{HALVES}*", "-", _fmt(halves.get("ulira_raw"), "f3"),
                     _fmt(halves.get("ulira_cal"), "f3")])
        rows.append([_name(cell), "*schedule band (half - double)*", "-",
                     " - ".join(_fmt(v, "f3") for v in sorted(r["ulira_raw"] for r in sched)),
                     " - ".join(_fmt(v, "f3") for v in sorted(r["ulira_cal"] for r in sched))])
    import pagekit

    return lines + pagekit.table(["cell", "method", "% params", "U-LiRA raw", "U-LiRA cal"], rows) + [""]


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Write the figure (fixed size and dpi, no metadata that changes between runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = curve_cells(results)
    fig, axes = plt.subplots(2, len(cells), figsize=(3.2 * len(cells), 6.0), dpi=100, sharex=True, sharey=True,
                             squeeze=False)
    markers = dict(zip(METHODS, "o^sDv"))
    for j, cell in enumerate(cells):
        pts = points(cell)
        for i, (key, label) in enumerate((("ulira_raw", "raw"), ("ulira_cal", "calibrated"))):
            ax = axes[i][j]
            values = [sorted(r[key] for r in band(cell))]
            if values[0]:
                ax.axhspan(values[0][0], values[0][-1], color="0.85", label="schedule band")
            ax.axhline(row(cell, HALVES).get(key, 0.5), color="0.3", ls=":", label="retrained halves")
            ax.axhline(row(cell, "original").get(key, 1.0), color="tab:red", ls="--", lw=0.8, label="original")
            x = [p[1] for p in pts]
            y = [p[2] if key == "ulira_raw" else p[3] for p in pts]
            family = [(a, b) for a, b, p in zip(x, y, pts) if p[0] != "default"]  # the head-fit family: one line
            ax.plot([a for a, _ in family], [b for _, b in family], color="tab:blue", lw=1)
            for (method, share, _, _), v in zip(pts, y):
                ax.scatter([share], [v], marker=markers[method], zorder=3, label=METHODS[method],
                           color="tab:orange" if method == "default" else "tab:blue")
            ax.set_xscale("log")
            ax.set_ylim(0.4, 1.02)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(_name(cell).replace(" / class3", ""), fontsize=9)
            if i == 1:
                ax.set_xlabel("share of parameters updated")
            if j == 0:
                ax.set_ylabel(f"U-LiRA AUC ({label})")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
