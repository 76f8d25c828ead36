"""Terminal comparison table of unlearning runs (rich), mean ± std over seeds."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from lightning_unlearn.evidence.membership import INFORMATIVE_SHADOW_ACC
from lightning_unlearn.evidence.report import UnlearningReport

HEADERS = {
    "forget_acc": "forget", "remaining_acc": "remain", "test_acc": "test", "mia_efficacy": "MIA-eff [shadow]",
    "loss_auc": "loss AUC", "probe_forget_acc": "probe(forget)", "avg_gap": "gap", "acc_gap": "acc gap",
    "relearn_steps": "relearn steps", "tow": "ToW", "seconds": "time (s)",
}
DEFAULT_COLUMNS = (
    "forget_acc", "remaining_acc", "test_acc", "mia_efficacy", "loss_auc", "probe_forget_acc", "avg_gap", "acc_gap",
    "relearn_steps", "tow", "seconds",
)


def report_row(report: UnlearningReport | Mapping) -> dict:
    """Flatten a report (or its dict) to one row: the unlearned model's metrics + comparison + total time."""
    data = report.to_dict() if isinstance(report, UnlearningReport) else dict(report)
    row = {"method": data["method"], **data.get("metrics", {}).get("unlearned", {}), **data.get("comparison", {})}
    row["seconds"] = data.get("timings_s", {}).get("total")
    if "relearn_steps_unlearned" in row:
        row["relearn_steps"] = row["relearn_steps_unlearned"]
    return row


def aggregate(rows: Iterable[Mapping], by: str = "method") -> dict[str, dict[str, tuple[float, float, int]]]:
    """Group rows by ``by``: ``{group: {column: (mean, std, n)}}`` over the numeric values present (std: sample std)."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for key, value in row.items():
            if key != by and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                groups[str(row[by])][key].append(float(value))
    out = {}
    for name, cols in groups.items():
        out[name] = {}
        for key, vals in cols.items():
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
            out[name][key] = (mean, std, len(vals))
    return out


def format_cell(stat: tuple[float, float, int] | None, column: str, shadow: tuple[float, float, int] | None = None) -> str:
    """Accuracy-like columns in percent, others as plain numbers; '-' when missing.

    MIA-efficacy is never shown bare: its shadow classifier's accuracy follows in brackets,
    with ``!`` when it is below the informative threshold (the score then means nothing).
    """
    if stat is None:
        return "-"
    mean, std, n = stat
    pct = column.endswith(("acc", "efficacy", "fraction", "asr")) or column in ("loss_auc",)
    scale, digits = (100.0, 1) if pct else (1.0, 0 if column.endswith("steps") else 1 if column == "seconds" else 2)
    text = f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n > 1 else "")
    if column == "tow":
        text = f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")
    if column == "mia_efficacy":
        if shadow is None:
            return text + " [shadow ?!]"
        flag = "!" if shadow[0] < INFORMATIVE_SHADOW_ACC else ""
        text += f" [{shadow[0] * 100:.0f}%{flag}]"
    return text


def compare(
    runs: Iterable[UnlearningReport | Mapping],
    columns: Sequence[str] = DEFAULT_COLUMNS,
    title: str | None = None,
    console: Console | None = None,
) -> Table:
    """Print (and return) a table with one row per method, mean ± std over the runs given.

    ``runs`` are :class:`UnlearningReport` objects or flat dict rows with a ``"method"`` key.
    Accuracies, MIA-efficacy and AUC are shown in percent; Avg. Gap is in points already.
    MIA-efficacy carries its shadow accuracy, ``!`` marking an uninformative attack (< 55%).
    """
    rows = [report_row(r) if isinstance(r, UnlearningReport) or "metrics" in r else dict(r) for r in runs]
    if not rows:
        raise ValueError("compare needs at least one run")
    stats = aggregate(rows)
    columns = [c for c in columns if any(c in cols for cols in stats.values())]  # no empty columns
    caption = "MIA-eff [shadow acc; ! = below 55%, uninformative]" if "mia_efficacy" in columns else None
    table = Table(title=title, caption=caption)
    table.add_column("method")
    for col in columns:
        table.add_column(HEADERS.get(col, col), justify="right")
    for method, cols in stats.items():
        table.add_row(method, *[format_cell(cols.get(c), c, cols.get("mia_shadow_acc")) for c in columns])
    (console or Console()).print(table)
    return table
