"""Regenerate every benchmark page (docs/benchmarks/<name>.md) from the results JSONs; no training.

    python benchmarks/render_all.py            # write the pages
    python benchmarks/render_all.py --check    # exit 1 and name the pages that differ from a fresh render
    python benchmarks/render_all.py --only forgetting central

Each page is rendered by ``render_page(results)`` in the benchmark script of the same name.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PAGES_DIR = ROOT / "docs" / "benchmarks"

# Page order of the docs' Benchmarks section: the current defaults first, then by topic.
PAGES = [
    "forgetting", "full_mnist_default", "evidence", "central", "core_mnist", "reset_digits", "ddp_digits",
    "federated_mnist", "federated_scale", "flower_overhead", "flower_deployment", "dp_mnist", "sisa", "ledger",
]


def script(name: str) -> ModuleType:
    """Import benchmarks/<name>.py as a module (the scripts import their siblings from this folder)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(name: str, results: Path = RESULTS) -> str:
    """The page of benchmark ``name`` rendered from the JSONs under ``results``."""
    return script(name).render_page(results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=PAGES, default=PAGES)
    p.add_argument("--check", action="store_true", help="compare with the committed pages instead of writing")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=PAGES_DIR)
    args = p.parse_args(argv)
    stale = []
    for name in args.only:
        text, path = render(name, args.results), args.out / f"{name}.md"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run python benchmarks/render_all.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
