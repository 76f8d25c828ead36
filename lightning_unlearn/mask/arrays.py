"""Model <-> arrays: what FedAvg exchanges, and the selected slices a masked round sends.

Clients, server, protocol and the Flower apps of :mod:`lightning_unlearn.federated` build on it.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from lightning_unlearn.mask.parameter_mask import ParameterMask


def get_arrays(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point state (parameters and BatchNorm statistics): what FedAvg exchanges."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def set_arrays(model: nn.Module, arrays: Mapping[str, Tensor]) -> None:
    """Load float arrays into ``model``; integer buffers (``num_batches_tracked``) stay local."""
    state = model.state_dict()
    unknown = sorted(set(arrays) - set(state))
    if unknown:
        raise ValueError(f"arrays name entries the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for k, v in arrays.items():
            state[k].copy_(v)


def selected_values(arrays: Mapping[str, Tensor], mask: ParameterMask) -> dict[str, Tensor]:
    """The masked elements of each parameter, flattened in row-major order (what a masked round sends)."""
    return {n: arrays[n][m].clone() for n, m in mask.masks.items() if bool(m.any())}


def write_values(arrays: Mapping[str, Tensor], mask: ParameterMask, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``arrays`` with the masked elements replaced by ``values``; every other element is untouched."""
    out = {k: v.clone() for k, v in arrays.items()}
    for n, v in values.items():
        out[n][mask.masks[n]] = v.to(out[n].dtype)
    return out
