"""The README's API section lists exactly what each public package exports (``__all__``)."""
from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PACKAGES = (
    "lightning_unlearn",
    "lightning_unlearn.callbacks",
    "lightning_unlearn.data",
    "lightning_unlearn.evidence",
    "lightning_unlearn.baselines",
    "lightning_unlearn.federated",
    "lightning_unlearn.federated.flower",
    "lightning_unlearn.privacy",
    "lightning_unlearn.exact",
    "lightning_unlearn.ledger",
)


def readme_api() -> dict[str, list[str]]:
    text = README.read_text()
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = re.match(r"- `(lightning_unlearn[\w.]*)`: (.*)", line)
        if m:
            out[m.group(1)] = re.findall(r"`([^`]+)`", m.group(2))
    return out


def test_readme_lists_every_public_package():
    assert sorted(readme_api()) == sorted(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_readme_api_matches_all(package):
    module = importlib.import_module(package)
    assert readme_api()[package] == sorted(module.__all__, key=str.lower)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in module.__all__:  # every listed name exists, and none of them is a deprecated alias
            getattr(module, name)

