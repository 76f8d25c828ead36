"""lightning-unlearn: make a trained Lightning model forget a class, a client or samples.

Explain the model (captum), select the channels most tied to the data to forget, and
update only those, with every other parameter left bit-for-bit unchanged.
"""
from lightning_unlearn.api import retrain, unlearn
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.repair import UnlearningMixin
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.result import UnlearningResult

__version__ = "0.1.0"
__all__ = ["ForgetRequest", "ParameterMask", "UnlearnConfig", "UnlearningMixin", "UnlearningResult", "retrain", "unlearn"]
