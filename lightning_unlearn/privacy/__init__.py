"""Differential privacy (Opacus DP-SGD) for Lightning models, centrally and per federated client.

DP-SGD is the *preventive* alternative to unlearning: it bounds every sample's influence on
the model up front, at a cost in accuracy, where unlearning removes specific samples on request.
Needs the ``dp`` extra (``pip install lightning-unlearn[dp]``); this package imports without it
and fails with that instruction on first use.
"""
from lightning_unlearn.privacy._opacus import INSTALL_HINT, require_opacus
from lightning_unlearn.privacy.accounting import ACCOUNTANTS, epsilon_for, noise_for
from lightning_unlearn.privacy.callback import DifferentialPrivacy
from lightning_unlearn.privacy.compat import (
    UnsupportedModelError,
    dp_compatibility_errors,
    is_dp_compatible,
    make_dp_compatible,
)
from lightning_unlearn.privacy.federated import ClientPrivacy, attach_client_dp, attach_settings_dp, prepare_model
from lightning_unlearn.privacy.models import DPSmallCNN, group_norm_for

__all__ = [
    "ACCOUNTANTS",
    "ClientPrivacy",
    "DPSmallCNN",
    "DifferentialPrivacy",
    "UnsupportedModelError",
    "attach_client_dp",
    "attach_settings_dp",
    "dp_compatibility_errors",
    "epsilon_for",
    "is_dp_compatible",
    "make_dp_compatible",
    "group_norm_for",
    "noise_for",
    "prepare_model",
]
