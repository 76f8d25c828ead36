"""Lets the registry's torchvision wheel import against the CPU-only torch of the peers' environment.

The torchvision wheel on the registry is a CUDA build: its compiled ops (``_C.so``) link CUDA
libraries that the CPU torch wheel does not ship, so torchvision's own loader gives up on them
quietly and then ``torchvision/_meta_registrations.py`` fails at import with
``RuntimeError: operator torchvision::nms does not exist`` (it registers fake kernels for ``nms``
and ``qnms`` without checking that the ops were loaded; the other ops are guarded). Lightning
imports torchvision through torchmetrics, and SUPREME imports it directly (datasets, JiT's
``transforms.v2``), so without this nothing in the peers' environment imports.

The fix is the smallest one that keeps torchvision honest: right after ``torchvision.extension``
has tried (and failed) to load ``_C.so``, declare the two op schemas so the fake-kernel
registration finds them. No kernel is registered: calling ``torchvision.ops.nms`` still fails,
and nothing the peers run calls it. If ``_C.so`` did load (a matching CPU build), nothing is done.

Installed by ``benchmarks/peers/setup.sh`` as a ``.pth`` hook in the peers' virtual environment
only (never in the project's ``.venv``); it costs nothing until torchvision is imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

#: The schemas of the two ops that ``_meta_registrations.py`` registers without a guard (as in torchvision's C++).
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = []  # keeps the torch.library.Library alive (its definitions vanish when it is collected)


def declare_missing_ops() -> bool:
    """Declare ``torchvision::nms``/``qnms`` if torchvision's compiled ops did not load; True if declared."""
    import torch

    extension = sys.modules.get("torchvision.extension")
    if extension is not None and extension._has_ops():
        return False
    if hasattr(torch.ops.torchvision, "nms"):
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)
    return True


class _AfterExtension(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_missing_ops` right after ``torchvision.extension`` executes."""

    def find_spec(self, name, path, target=None):
        if name != "torchvision.extension":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            declare_missing_ops()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _AfterExtension) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterExtension())
