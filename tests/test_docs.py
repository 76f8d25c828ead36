"""The docs cannot rot: the README's, the Guides' and the How-tos' Python blocks run, the benchmark pages equal a
fresh render from the committed results, and the site builds with ``mkdocs build --strict``."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RUNNABLE = [README, *sorted([*DOCS.glob("guides/*.md"), *DOCS.glob("how-to/*.md")])]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"^# docs: skip \((.+)\)$")


def blocks(page: Path) -> list[tuple[str, str | None]]:
    """The page's python blocks, each with its skip reason (None: it runs)."""
    out = []
    for code in BLOCK.findall(page.read_text()):
        first = code.splitlines()[0] if code.strip() else ""
        match = SKIP.match(first.strip())
        out.append((code, match.group(1) if match else None))
    return out


SKIPPED = [(p, i, reason) for p in RUNNABLE for i, (_, reason) in enumerate(blocks(p)) if reason]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page: Path, tmp_path, monkeypatch) -> None:
    """Every unmarked block of a page runs, in order, in one namespace, in an empty folder."""
    runnable = [code for code, reason in blocks(page) if reason is None]
    assert runnable, f"{page} has no runnable python block"
    monkeypatch.chdir(tmp_path)
    from lightning_unlearn.config import SCORERS

    registered = dict(SCORERS)  # a how-to registers its own scorer: keep it out of the other tests
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    try:
        for n, code in enumerate(runnable):
            try:
                exec(compile(code, f"{page.relative_to(ROOT)}[block {n}]", "exec"), namespace)
            except Exception as err:  # name the page and block: the docs are what must change
                raise AssertionError(f"{page.relative_to(ROOT)} block {n} failed: {err!r}") from err
    finally:
        SCORERS.clear()
        SCORERS.update(registered)


@pytest.mark.parametrize("page,index,reason", SKIPPED, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_marked_blocks_are_skipped_with_their_reason(page: Path, index: int, reason: str) -> None:
    """A block that needs something a test cannot have (several processes, a deployment) says why, visibly."""
    assert len(reason) > 15, f"{page} block {index}: give a real reason"
    pytest.skip(f"{page.relative_to(ROOT)} block {index}: {reason}")


def _render_all():
    spec = importlib.util.spec_from_file_location("render_all", ROOT / "benchmarks" / "render_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_pages_equal_their_render_from_the_committed_results() -> None:
    render_all = _render_all()
    pages = {p.stem for p in (DOCS / "benchmarks").glob("*.md")} - {"index", "history"}
    assert pages == set(render_all.PAGES), f"pages without a renderer or renderers without a page: {pages ^ set(render_all.PAGES)}"
    stale = [name for name in render_all.PAGES
             if (DOCS / "benchmarks" / f"{name}.md").read_text() != render_all.render(name)]
    assert not stale, f"stale benchmark pages (run python benchmarks/render_all.py): {stale}"


def test_docs_name_no_issue_or_how_the_work_was_organised() -> None:
    """Neither the README nor a docs page refers to an issue number or to how the work was organised."""
    bad = re.compile(r"\bissues?\s*#?\d+|\bhelpers?\b|\bsessions?\b|#\d{1,3}\b", re.I)
    pages = [README, *DOCS.rglob("*.md")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages for m in bad.finditer(p.read_text())]
    assert not hits, hits


def test_settings_table_lists_every_field_with_its_default() -> None:
    from dataclasses import MISSING, fields

    from lightning_unlearn import UnlearnConfig

    text = (DOCS / "concepts" / "settings.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, re.M))
    expected = {f.name: str(f.default) for f in fields(UnlearnConfig) if f.default is not MISSING}
    assert rows == expected, {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k) != v}


def test_mkdocs_build_strict(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_readme_is_a_landing_page() -> None:
    """The README stays short and points into the docs; its links to them resolve (GitHub renders them as files)."""
    text = README.read_text()
    assert len(text.encode()) <= 16_000, f"README is {len(text.encode())} bytes; move detail into docs/"
    assert "make demo" in text and "make test" in text and "mkdocs serve" in text
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text)
    assert links, "the README links no docs page"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert "BENCHMARKS.md#" not in text, "BENCHMARKS.md is an index: link the docs/benchmarks pages"
