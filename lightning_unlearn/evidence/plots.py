"""PNG plots for a report. Uses matplotlib's Agg canvas directly: no display, no global pyplot state."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_unlearn._io import unique_path
from lightning_unlearn.mask import ParameterMask


def _save(fig: Figure, path: str | os.PathLike, on_exists: str) -> Path:
    path = unique_path(path, on_exists)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_per_class_accuracy(
    per_class: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike,
    forget_classes: Sequence[int] = (),
    on_exists: str = "suffix",
) -> Path:
    """Grouped bars: test accuracy per class for each model (e.g. original / unlearned / retrained)."""
    if not per_class:
        raise ValueError("plot_per_class_accuracy needs at least one model's per-class accuracies")
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    names = list(per_class)
    num_classes = len(next(iter(per_class.values())))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [np.nan if v is None else v for v in per_class[name]]
        ax.bar(np.arange(num_classes) + i * width - 0.4 + width / 2, values, width, label=name)
    for c in forget_classes:
        ax.axvspan(c - 0.45, c + 0.45, color="red", alpha=0.08)
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("class (shaded: forgotten)" if forget_classes else "class")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path, on_exists)


def plot_channel_scores(
    scores: Mapping[str, "np.ndarray | object"],
    path: str | os.PathLike,
    mask: ParameterMask | None = None,
    on_exists: str = "suffix",
) -> Path:
    """One panel per scored layer: channel scores sorted high to low, selected channels in red."""
    if not scores:
        raise ValueError("plot_channel_scores needs at least one layer's scores")
    layers = list(scores)
    fig = Figure(figsize=(3.2 * len(layers), 2.8))
    selected = mask.channels if mask is not None else {}
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), i + 1)
        s = np.asarray(scores[layer].detach().cpu() if hasattr(scores[layer], "detach") else scores[layer], dtype=float)
        order = np.argsort(-s)
        chosen = np.isin(order, selected.get(layer, []))
        colors = np.where(chosen, "tab:red", "tab:gray")
        ax.bar(np.arange(len(s)), s[order], color=colors, width=1.0)
        ax.set_title(f"{layer} ({int(chosen.sum())}/{len(s)} selected)", fontsize=8)
        ax.set_xlabel("channel (sorted)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.axes[0].set_ylabel("score")
    return _save(fig, path, on_exists)


def plot_mia_histograms(
    confidences: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    on_exists: str = "suffix",
) -> Path:
    """Per model, histograms of true-label confidence for members (retain), non-members (test) and the forget set."""
    if not confidences:
        raise ValueError("plot_mia_histograms needs at least one model's confidences")
    fig = Figure(figsize=(3.4 * len(confidences), 2.8))
    bins = np.linspace(0, 1, 26)
    for i, (model_name, groups) in enumerate(confidences.items()):
        ax = fig.add_subplot(1, len(confidences), i + 1)
        for group, values in groups.items():
            ax.hist(np.asarray(values), bins=bins, alpha=0.5, density=True, label=group)
        ax.set_title(model_name, fontsize=9)
        ax.set_xlabel("true-label confidence", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    fig.axes[0].set_ylabel("density (log)")
    fig.axes[0].legend(fontsize=7)
    return _save(fig, path, on_exists)
