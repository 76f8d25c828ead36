"""The mask: channel scores -> :class:`ParameterMask` (selection), exact enforcement of the frozen
elements during training (:class:`MaskEnforcer`), and the selected slices as arrays (what a masked
federated round exchanges)."""
from lightning_unlearn.mask.arrays import get_arrays, selected_values, set_arrays, write_values
from lightning_unlearn.mask.enforcement import BN_TYPES, MaskEnforcer, frozen_elements_equal
from lightning_unlearn.mask.parameter_mask import ParameterMask
from lightning_unlearn.mask.selection import head_parameter_scales, select_channels

__all__ = [
    "BN_TYPES", "MaskEnforcer", "ParameterMask", "frozen_elements_equal", "get_arrays", "head_parameter_scales",
    "select_channels", "selected_values", "set_arrays", "write_values",
]
