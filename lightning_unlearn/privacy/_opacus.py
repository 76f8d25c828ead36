"""The one place that imports Opacus: a missing ``dp`` extra fails with the install command."""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install lightning-unlearn[dp]"


def require_opacus() -> ModuleType:
    """Import and return ``opacus``; without it raise an ImportError that says how to install it.

    Imported lazily so that ``lightning_unlearn.privacy`` (and the rest of the library) imports
    without the optional extra.
    """
    try:
        return importlib.import_module("opacus")
    except ImportError as err:
        raise ImportError(
            f"differential privacy needs Opacus, which is not installed: run `{INSTALL_HINT}` "
            f"(or `pip install 'opacus>=1.5'`); import failed with: {err}"
        ) from err
