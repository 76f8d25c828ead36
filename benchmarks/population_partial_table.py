"""docs/benchmarks/population_partial.md from the top-k retraining results (``population_*_partial.json``).

Each cell's table carries the reference rows of that run and, marked "(candidates' run)", the library default and
the population harness's candidates from the same cell's ``population_<cell>.json`` (same cached originals and
retrained populations; their "x faster" was timed in that run). "% params" is the share of parameter elements the
method may change: the top's for ``top_retrain_k`` (the bottom is bit-for-bit the original's), 100 for
whole-model distillation, the forgotten head rows for ``headfit``.

    .venv/bin/python benchmarks/population_partial_table.py      # or: python benchmarks/render_all.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pagekit  # noqa: E402
from population import ARCHS, DATASETS, RESULTS, _fmt  # noqa: E402
from population_methods import head_layer  # noqa: E402
from population_partial import param_share  # noqa: E402

COLUMNS = (("forget_acc", "forget", "pct"), ("remaining_acc", "remaining", "pct"), ("test_acc", "test", "pct"),
           ("confidence", "mean phi", "f1"), ("ulira_raw", "U-LiRA raw", "f3"), ("ulira_cal", "U-LiRA cal", "f3"),
           ("relearn_steps", "relearn", "f0"), ("speedup", "x faster", "f1"), ("share", "% params", "pct"))
CANDIDATE_ROWS = ("default", "distill_whole", "headfit", "distill_headfit_b6")


def share_of(method: str, arch: str, request: str, dataset: str = "digits") -> float | None:
    model = ARCHS[arch](num_classes=10, image_size=DATASETS[dataset].image_size, epochs=30)
    total = sum(p.numel() for p in model.parameters())
    if method.startswith("distill_whole") or method.startswith("distill_top") or method.startswith("distill_headfit"):
        return 1.0
    if method.startswith("top_retrain"):
        return param_share(model, int(method.rsplit("_", 1)[1]))
    if method == "headfit" and request.startswith("class"):
        head = head_layer(model)
        return (head.in_features + (head.bias is not None)) / total  # one forgotten row
    return None


def render_page(results: Path = RESULTS) -> str:
    """The page: one table per cell, reference rows in italics, the candidates' rows of the same cell below."""
    paths, cells, out = pagekit.cells_page(
        results, "population_*_partial.json", "Top-k retraining on the population harness",
        "population_partial_table.py",
        "Methods of `benchmarks/population_partial.py`: the top k blocks of the network retrained from scratch on "
        "the retain data, the bottom bit-for-bit the original's; columns as on the "
        "[population evidence page](population.md). Rows marked (candidates' run) come from the same cell's "
        "`population_<cell>.json` (same cached populations; speed timed in that run). **% params**: share of "
        "parameter elements the method may change.")
    for path, res in zip(paths, cells):
        cell = path.name[len("population_"):-len("_partial.json")]
        rows = list(res["rows"])
        m_path = results / f"population_{cell}.json"
        if m_path.exists():
            mine = {r["method"] for r in rows}
            rows += [dict(r, method=f"{r['method']} (candidates' run)") for r in json.loads(m_path.read_text())["rows"]
                     if r["method"] in CANDIDATE_ROWS and r["method"] not in mine]
        out += [f"## {res['dataset']} / {res['architecture']} / {res['request']}", "",
                f"K = {res['k']}, {res['epochs']} epochs, {res['recipe']['optimizer']} lr {res['recipe']['lr']:g}; "
                f"retraining {res['retrain_s']:.2f} CPU s in this run. Command: `{res.get('command', '?')}`.", "",
                "| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for r in rows:
            base = r["method"].split(" (")[0]
            r = dict(r, share=share_of(base, res["architecture"], res["request"], res["dataset"]) if r["kind"] == "method" else None)
            name = r["method"] if r["kind"] == "method" else f"*{r['method']}*"
            out.append(f"| {name} | " + " | ".join(_fmt(r.get(k), kind) for k, _, kind in COLUMNS) + " |")
        out.append("")
    return pagekit.finish(out)


def main() -> int:
    import render_all

    return render_all.main(["--only", "population_partial"])


if __name__ == "__main__":
    raise SystemExit(main())
