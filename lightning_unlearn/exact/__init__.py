"""Exact unlearning: SISA sharded, sliced training where a deletion retrains only the affected shards.

``SISA(root, model_factory, train_dataset, SISAConfig(shards=5, slices=5)).fit()`` trains;
``.forget(ForgetRequest(...))`` deletes exactly; ``.ensemble()`` is the model to serve.
"""
from lightning_unlearn.exact.plan import SISAConfig
from lightning_unlearn.exact.sisa import SISA

__all__ = ["SISA", "SISAConfig"]
