"""Differential privacy (Opacus DP-SGD) for Lightning models, centrally and per federated client.

DP-SGD is the *preventive* alternative to unlearning: it bounds every sample's influence on
the model up front, at a cost in accuracy, where unlearning removes specific samples on request.
Needs the ``dp`` extra (``pip install lightning-unlearn[dp]``); this package imports without it
and fails with that instruction on first use.
"""
from lightning_unlearn.privacy.accounting import epsilon_for, noise_for
from lightning_unlearn.privacy.callback import DifferentialPrivacy
from lightning_unlearn.privacy.compat import make_dp_compatible
from lightning_unlearn.privacy.federated import attach_client_dp

__all__ = ["DifferentialPrivacy", "attach_client_dp", "epsilon_for", "make_dp_compatible", "noise_for"]
