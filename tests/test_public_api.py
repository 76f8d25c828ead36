"""The public API is small and each name has one home: the README's "## API" section is generated from the
public packages' ``__all__`` (``python tests/test_public_api.py`` rewrites it), at most 60 names in all, no
name in two lists, no re-export of another package's name, no wire-level type."""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PACKAGES = (
    "lightning_unlearn",
    "lightning_unlearn.callbacks",
    "lightning_unlearn.scoring",
    "lightning_unlearn.data",
    "lightning_unlearn.evidence",
    "lightning_unlearn.baselines",
    "lightning_unlearn.federated",
    "lightning_unlearn.federated.flower",
    "lightning_unlearn.privacy",
    "lightning_unlearn.exact",
    "lightning_unlearn.ledger",
)
MAX_NAMES = 60
#: Modules whose types are the wire format (messages and their record codec): never public.
WIRE_MODULES = ("lightning_unlearn.federated.messages",)
HEADER = """What is public is what each package's `__all__` lists; `tests/test_public_api.py` holds this list to
the code (`python tests/test_public_api.py` regenerates it). Everything else (modules starting with `_`,
names not listed, the wire-level message types) may change without notice."""


def public_names() -> dict[str, list[str]]:
    return {p: sorted(importlib.import_module(p).__all__, key=str.lower) for p in PACKAGES}


def api_section() -> str:
    lines = [f"- `{p}`: " + ", ".join(f"`{n}`" for n in names) for p, names in public_names().items()]
    return "\n## API\n\n" + HEADER + "\n\n" + "\n".join(lines) + "\n"


def _split(text: str) -> tuple[str, str, str]:
    head, rest = text.split("\n## API\n", 1)
    body, tail = rest.split("\n## ", 1)
    return head, "\n## API\n" + body, "\n## " + tail


def write_readme() -> None:
    head, _, tail = _split(README.read_text())
    README.write_text(head + api_section().rstrip("\n") + "\n" + tail)


def test_readme_api_section_is_generated_from_all():
    assert _split(README.read_text())[1].rstrip("\n") == api_section().rstrip("\n"), \
        "README's API section is stale: run `python tests/test_public_api.py`"


def test_the_public_api_is_small():
    total = sum(len(v) for v in public_names().values())
    assert total <= MAX_NAMES, f"{total} public names (at most {MAX_NAMES}): {public_names()}"


def test_one_meaning_per_name():
    seen: dict[str, str] = {}
    for package, names in public_names().items():
        for name in names:
            assert name not in seen, f"{name!r} is exported by both {seen[name]} and {package}"
            seen[name] = package


def _home(package: str, obj: object) -> str | None:
    """The package an exported class or function is defined in (None for values: constants, registries)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return None
    module = obj.__module__
    owners = [p for p in PACKAGES if module == p or module.startswith(p + ".")]
    return max(owners, key=len) if owners else module


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_name_lives_in_its_package_and_is_not_wire_level(package):
    module = importlib.import_module(package)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated alias is listed
        for name in module.__all__:
            obj = getattr(module, name)
            home = _home(package, obj)
            assert home in (None, package), f"{package} re-exports {name!r} from {home}"
            assert getattr(obj, "__module__", "") not in WIRE_MODULES, f"{package} exports wire-level {name!r}"


def test_the_generator_replaces_only_the_api_section(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## API\n\nstale list\n\n## Next\n\nkept\n")
    monkeypatch.setattr(sys.modules[__name__], "README", readme)
    write_readme()
    text = readme.read_text()
    assert text.startswith("# x\n\n## API\n\nWhat is public") and text.endswith("\n## Next\n\nkept\n")
    assert "stale list" not in text and re.search(r"- `lightning_unlearn.ledger`: .*`verify`", text)


if __name__ == "__main__":
    write_readme()
    print(f"rewrote the API section of {README}")
