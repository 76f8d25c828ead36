"""Regenerate every benchmark page (docs/benchmarks/<name>.md) from the results JSONs; no training.

    python benchmarks/render_all.py            # write the pages
    python benchmarks/render_all.py --check    # exit 1 and name the pages that differ from a fresh render
    python benchmarks/render_all.py --only forgetting central

Each page is rendered by ``render_page(results)`` in the benchmark script of the same name (``SCRIPTS`` names
the few that live elsewhere). A script may also define ``render_assets(results, out)``, which writes the page's
figures (PNG) next to it; ``--check`` compares the pages' text only (each figure's numbers are in a table on its
page), since a PNG's bytes depend on the installed matplotlib and fonts.
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
    "federated_mnist", "federated_recovery", "federated_population", "federated_scale", "flower_overhead", "flower_deployment", "dp_mnist",
    "sisa", "ledger",
    "population", "population_partial", "population_init", "peers",
]
#: Pages whose renderer is not benchmarks/<name>.py: page -> script path under benchmarks/, without ".py".
SCRIPTS = {"population_partial": "population_partial_table", "peers": "peers/run_population"}


def script(name: str) -> ModuleType:
    """Import the renderer of page ``name`` as a module (the scripts import their siblings from this folder)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    path = SCRIPTS.get(name, name)
    spec = importlib.util.spec_from_file_location(f"_bench_{path.replace('/', '_')}", HERE / f"{path}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered first: dataclasses look their module up while it executes
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
        module = script(name)
        text, path = module.render_page(args.results), args.out / f"{name}.md"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
            assets = getattr(module, "render_assets", None)
            if assets is not None:
                for figure in assets(args.results, args.out):
                    print(f"wrote {figure}")
    if stale:
        print("stale (run python benchmarks/render_all.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
