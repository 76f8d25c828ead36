"""Federated baselines on the same clients and request as :func:`federated_unlearn`."""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_unlearn._training import reinitialize
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.data.federated import FederatedForgetPlan
from lightning_unlearn.federated.federation import Federation, as_federation
from lightning_unlearn.federated.fedavg import UpdateStore, run_fedavg
from lightning_unlearn.federated.messages import down, with_config
from lightning_unlearn.federated.protocol import (
    FederatedUnlearningResult, masked_rounds, remove, round_bytes, unlearn_config,
)
from lightning_unlearn.federated.server import aggregate_scores, check_arrays, of_kind
from lightning_unlearn.mask import ParameterMask, select_channels
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.orchestration import prepare
from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.scoring.layers import LayerInfo


def _federation(clients: Any, plan: FederatedForgetPlan) -> Federation:
    fed = as_federation(clients)
    fed.request = plan.request  # every node resolves its own split of it
    fed.start_run()
    return fed


def _result(method: str, model: torch.nn.Module, mask: ParameterMask, fed: Federation, history: list[dict],
            t_select: float, elapsed: float, scoring: str = "score", **kwargs: Any) -> FederatedUnlearningResult:
    """A baseline's result: its timings (selection, then unlearning) and bytes (``scoring``: its rounds' label)."""
    return FederatedUnlearningResult(
        model, mask, method=method, timings_s={"scoring": t_select, "unlearning": elapsed, "total": t_select + elapsed},
        bytes=round_bytes(history, fed.run, scoring), history=history, traffic=fed.run, **kwargs)


def _masked_baseline(method: str, fed: Federation, work: torch.nn.Module, mask: ParameterMask, rounds: int,
                     config: Mapping[str, Any], t_select: float = 0.0, reset: UnlearnConfig | None = None,
                     **kwargs: Any) -> FederatedUnlearningResult:
    """Masked rounds on ``mask`` from ``work`` (updated in place); with ``reset`` (a resolved config) its ``reset``
    removes the slices first, as ours."""
    t0 = time.perf_counter()
    statistics = remove(fed, work, mask, reset) if reset else None
    current, history = masked_rounds(fed, get_arrays(work), mask, rounds, config, label=method, statistics=statistics)
    set_arrays(work, current)
    return _result(method, work, mask, fed, history, t_select, time.perf_counter() - t0, config=reset, **kwargs)


def federated_retrain(
    model: pl.LightningModule, clients: Sequence[Any], plan: FederatedForgetPlan, rounds: int, local_epochs: int = 1,
    fraction: float = 1.0, seed: int = 0, evaluate=None, progress: bool = True,
) -> FederatedUnlearningResult:
    """Fresh weights, FedAvg on every client's retain data only; clients without retain data sit out."""
    fresh, fed = reinitialize(copy.deepcopy(model), seed), _federation(clients, plan)
    t0 = time.perf_counter()
    out = run_fedavg(fresh, fed, rounds, fraction, local_epochs, seed, data="retain", evaluate=evaluate, deploy=False,
                     progress=progress, label="retrain", participants=plan.retaining_clients)
    elapsed = time.perf_counter() - t0
    return FederatedUnlearningResult(
        fresh, ParameterMask.full(fresh), method="retrain", history=out.history,
        timings_s={"retrain": elapsed, "unlearning": elapsed, "total": elapsed},
        bytes={**round_bytes(out.history), "fedavg_round": out.bytes_per_round},
        extra={"rounds": rounds, "overhead_fraction": out.overhead_fraction})


def federated_finetune(
    model: pl.LightningModule, clients: Sequence[Any], plan: FederatedForgetPlan, layers: Mapping[str, LayerInfo],
    rounds: int = 1, local_epochs: int = 1, max_steps: int | None = None, seed: int = 0,
) -> FederatedUnlearningResult:
    """All channels trainable, retain data only, the same rounds and local steps as ours."""
    mask = ParameterMask.from_channels(model, {n: list(range(i.out_channels)) for n, i in layers.items()}, layers)
    config = {"objective": "retain", "epochs": local_epochs, "max_steps": max_steps, "seed": seed, "mode": "train"}
    return _masked_baseline("finetune", _federation(clients, plan), copy.deepcopy(model), mask, rounds, config)


def federated_random_channels(
    model: pl.LightningModule, clients: Sequence[Any], plan: FederatedForgetPlan, layers: Mapping[str, LayerInfo],
    config: UnlearnConfig | None = None, *, rounds: int = 1, **overrides: Any,
) -> FederatedUnlearningResult:
    """Our protocol with channels drawn at random (same ratio, same head rows, same ``reset``): is the explanation
    worth it?"""
    cfg = UnlearnConfig.build(config, **overrides).resolved(plan.request, "federated")
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = {n: torch.rand(i.out_channels, generator=gen) for n, i in layers.items()}
    mask = prepare(model, scores, cfg, layers)  # the selection ours runs, on random scores
    return _masked_baseline("random_channels", _federation(clients, plan), copy.deepcopy(model), mask, rounds,
                            unlearn_config(cfg), reset=cfg)


def cdp_tfidf(docs: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """TF-IDF of channels (terms) over documents (the forget set, each retained class), per layer: a channel occurs
    in a document where its activation is above its mean over documents; IDF: scikit-learn's smoothed one."""
    names = list(docs)
    out: dict[str, dict[str, Tensor]] = {d: {} for d in names}
    for layer in next(iter(docs.values())):
        act = torch.stack([docs[d][layer].double() for d in names])  # (D, C)
        tf = act / act.sum(1, keepdim=True).clamp(min=1e-12)
        idf = torch.log((1 + len(names)) / (1 + (act > act.mean(0, keepdim=True)).sum(0).double())) + 1
        for i, d in enumerate(names):
            out[d][layer] = (tf[i] * idf).float()
    return out


def federated_cdp(
    model: pl.LightningModule, clients: Sequence[Any], plan: FederatedForgetPlan, layers: Mapping[str, LayerInfo],
    ratio: float = 0.05, rounds: int = 1, local_epochs: int = 1, max_steps: int | None = None,
    max_samples: int | None = 256, seed: int = 0,
) -> FederatedUnlearningResult:
    """CDP: clients send per-document mean channel activations; the server prunes (zeroes) the
    channels with the highest TF-IDF for the forget document, then the federation fine-tunes the rest."""
    fed = _federation(clients, plan)
    t0 = time.perf_counter()
    head = [i.out_channels for i in layers.values() if i.is_head]
    docs: dict[str, ChannelScores] = {}  # count-weighted mean activations per document, over the clients holding it
    for doc in ["forget", *(f"class_{c}" for c in range(head[0] if head else 0))]:  # a client without it sends nothing
        if replies := fed.ask(down({}, {"max_samples": max_samples, "document": doc}), "query.cdp", "cdp_stats"):
            docs[doc] = aggregate_scores(replies, tag=doc)
    if "forget" not in docs:
        raise ValueError("no client holds data to forget: CDP has no forget document")
    if any(d.layers != docs["forget"].layers for d in docs.values()):
        raise ValueError("CDP replies describe other layers for different documents")
    tfidf = cdp_tfidf({doc: dict(d) for doc, d in docs.items()})["forget"]
    pruned = select_channels(tfidf, model, ratio, "layer", layers={n: i for n, i in layers.items() if n in tfidf})
    work = copy.deepcopy(model)
    state = work.state_dict()  # the pruned channels zeroed in place
    for n, m in pruned.masks.items():
        state[n][m] = 0
    trainable = ParameterMask({n: ~m for n, m in pruned.masks.items()}, pruned.channels)
    config = {"objective": "retain", "epochs": local_epochs, "max_steps": max_steps, "seed": seed, "mode": "prune"}
    return _masked_baseline("cdp", fed, work, trainable, rounds, config, time.perf_counter() - t0,
                            scoring="cdp_stats",
                            extra={"pruned_fraction": pruned.fraction, "pruned_channels": dict(pruned.channels)})


def federated_eraser(
    model: pl.LightningModule, clients: Sequence[Any], plan: FederatedForgetPlan, store: UpdateStore,
    calibration_ratio: float = 0.5, local_epochs: int = 1, local_steps: int | None = None, seed: int = 0,
) -> FederatedUnlearningResult:
    """FedEraser: replay each stored round from the first stored global model; each remaining client trains
    ``calibration_ratio`` of an epoch (of ``local_steps``) on retain data, and its stored update is re-applied in the
    new direction, ``||U_old|| * U_new / ||U_new||`` per tensor (count-weighted mean over clients)."""
    if store is None or not store.rounds:
        raise ValueError("FedEraser needs the client updates stored during training: run_fedavg(store_every=n)")
    if not 0 < calibration_ratio <= 1:
        raise ValueError(f"calibration_ratio must be in (0, 1], got {calibration_ratio!r}")
    fed = _federation(clients, plan)
    work = copy.deepcopy(model)
    current = {k: v.clone() for k, v in store.rounds[0]["global"].items()}
    contract = {k: (tuple(v.shape), v.dtype) for k, v in current.items()}
    budget = {"max_steps": max(1, math.ceil(calibration_ratio * local_steps))} if local_steps is not None else {
        "limit_train_batches": calibration_ratio}
    history = []
    t0 = time.perf_counter()
    for j, stored in enumerate(store.rounds):
        rt, label = time.perf_counter(), f"federaser/{j}"
        packed = down(current)  # the arrays packed once for every client of the round
        contents = {cid: with_config(packed, {"epochs": local_epochs, "seed": seed * 1_000 + j * 100 + cid,
                                             "data": "retain", **budget})
                    for cid in stored["updates"] if cid in plan.retaining_clients}
        replies = of_kind(fed.ask(contents, "train", label), "parameters")
        calibrated, counts = [], [m.num_samples for m in replies]
        for reply in replies:
            check_arrays(reply.tensors, contract, f"client {reply.client}", "parameters",
                         f"the {len(contract)} model arrays")
            new = {k: reply.tensors[k].double() - current[k].double() for k in current}
            calibrated.append({k: stored["updates"][reply.client][k].double().norm() * v / v.norm() if v.norm() > 0
                               else torch.zeros_like(v) for k, v in new.items()})
        if calibrated:
            w = np.asarray(counts, dtype=np.float64) / sum(counts)
            current = {k: (current[k].double() + sum(wi * s[k] for wi, s in zip(w, calibrated))).to(current[k].dtype)
                       for k in current}
        history.append(fed.row(j, rt, [], label) | {"clients": len(calibrated)})
    set_arrays(work, current)
    return _result("federaser", work, ParameterMask.full(work), fed, history, 0.0, time.perf_counter() - t0,
                   extra={"storage_bytes": store.nbytes, "stored_rounds": len(store.rounds), "store_every": store.every,
                          "calibration_ratio": calibration_ratio})
