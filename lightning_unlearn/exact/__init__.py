"""Exact unlearning: SISA sharded, sliced training where a deletion retrains only the affected shards.

``SISA(root, model_factory, train_dataset, SISAConfig(shards=5, slices=5)).fit()`` trains;
``.forget(ForgetRequest(...))`` deletes exactly; ``.ensemble()`` is the model to serve.
"""
from lightning_unlearn.exact.ensemble import SISAEnsemble
from lightning_unlearn.exact.plan import AGGREGATIONS, SISAConfig
from lightning_unlearn.exact.sisa import SISA, SISADeletion, client_ids

__all__ = ["AGGREGATIONS", "SISA", "SISAConfig", "SISADeletion", "SISAEnsemble", "client_ids"]
