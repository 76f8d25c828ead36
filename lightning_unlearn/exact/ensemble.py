"""The SISA ensemble: one LightningModule over the shard models, evaluated and exported like any model."""
from __future__ import annotations

import importlib
import json
import os
from typing import Callable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_unlearn._io import load_torch_file, save_torch, to_jsonable
from lightning_unlearn.exact.plan import AGGREGATIONS

FORMAT = "lightning-unlearn/sisa-ensemble/1"


class SISAEnsemble(pl.LightningModule):
    """Predicts with every shard model and aggregates.

    ``aggregation="mean_proba"``: ``forward`` returns the log of the mean softmax over shards
    (a log-probability, usable as logits). ``"vote"``: each shard votes for its argmax;
    ``forward`` returns the vote share plus a tie-break below one vote (the mean probability
    scaled by ``0.5 / shards``), so ``argmax`` is the majority class. Shard models must return
    class logits.
    """

    def __init__(self, models: Sequence[nn.Module], aggregation: str = "mean_proba",
                 shard_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; allowed values are {list(AGGREGATIONS)}")
        if not models:
            raise ValueError("a SISA ensemble needs at least one shard model")
        self.models = nn.ModuleList(models)
        self.aggregation = aggregation
        self.shard_ids = list(shard_ids) if shard_ids is not None else list(range(len(models)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x) for m in self.models])  # (shards, N, C)
        proba = F.softmax(logits, dim=-1).mean(0)
        if self.aggregation == "mean_proba":
            return proba.clamp_min(torch.finfo(proba.dtype).tiny).log()
        k = len(self.models)
        votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(proba.dtype).sum(0) / k
        return votes + proba * (0.5 / k)

    def test_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean(), batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), batch_size=len(y))

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """One file with every shard's weights, the aggregation and how to rebuild the shard models."""
        first = self.models[0]
        hparams = dict(getattr(first, "hparams", {}) or {})
        payload = {
            "format": FORMAT,
            "aggregation": self.aggregation,
            "shard_ids": list(self.shard_ids),
            "model_class": f"{type(first).__module__}.{type(first).__qualname__}",
            "hparams_json": json.dumps(to_jsonable(hparams)),
            "states": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in self.models],
        }
        save_torch(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model_factory: Callable[[], nn.Module] | None = None,
             aggregation: str | None = None) -> "SISAEnsemble":
        """Rebuild an ensemble saved with :meth:`save` (``weights_only=True``).

        Shard models come from ``model_factory`` or, without one, from the saved class path and
        hyper-parameters (importing that module).
        """
        payload = load_torch_file(path, "SISA ensemble")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a SISA ensemble file (expected format {FORMAT!r})")
        if model_factory is None:
            model_factory = _factory_from(payload["model_class"], json.loads(payload["hparams_json"]))
        models = []
        for state in payload["states"]:
            model = model_factory()
            model.load_state_dict(state)
            models.append(model)
        ensemble = cls(models, aggregation or payload["aggregation"], payload["shard_ids"])
        return ensemble.eval()


def _factory_from(class_path: str, hparams: dict) -> Callable[[], nn.Module]:
    module_name, _, name = class_path.rpartition(".")
    try:
        model_class = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import the shard model class {class_path!r}: pass model_factory=") from err
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise ValueError(f"{class_path!r} is not a torch.nn.Module class")
    return lambda: model_class(**hparams)
