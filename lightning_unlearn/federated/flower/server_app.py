"""The Flower ``ServerApp``: FedAvg training, then the federated unlearning protocol.

:class:`LightningFedAvg` is Flower's FedAvg with the library's client sampling and per-client
seeds (those of :func:`~lightning_unlearn.federated.server.run_fedavg`) and its aggregation
(:func:`~lightning_unlearn.federated.server.fedavg_aggregate`). :class:`MaskedUnlearning`
scores (``query.score`` -> :func:`aggregate_scores` -> :func:`~lightning_unlearn.orchestration.prepare`, the shared selection), then runs
masked rounds that send and aggregate only the selected slices (:func:`masked_aggregate`:
frozen values are copied from the deployed model, never averaged). Client failures stop the
run with the client's reason: Flower's own strategies would log them and go on with fewer
clients, which for unlearning means silently different results. A client that *disconnects*
(no reply within ``UnlearnPlan.round_timeout``, or the SuperLink reports its node unavailable)
is dropped from the masked rounds only if at least ``UnlearnPlan.min_clients`` replied (the
average is then over those, frozen elements still copied, never averaged); otherwise the run
stops and says which clients are missing. ``run_server(checkpoint=...)`` writes a
:class:`~lightning_unlearn.federated.flower.checkpoint.ServerCheckpoint` after every stage, so a
restarted server resumes with the same mask.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import Tensor

from lightning_unlearn._io import save_torch, write_json
from lightning_unlearn.scoring.channels import ChannelScores
from lightning_unlearn.evidence.report import UnlearningReport, weights_sha256
from lightning_unlearn.mask.arrays import get_arrays, set_arrays
from lightning_unlearn.federated.flower.checkpoint import ServerCheckpoint, plan_key
from lightning_unlearn.federated.flower.records import (
    ByteCounter,
    arrays_to_record,
    broadcast_to_content,
    content_to_reply,
    record_to_arrays,
)
from lightning_unlearn.federated.messages import Broadcast, RoundBytes, check_metrics
from lightning_unlearn.config import UnlearnConfig
from lightning_unlearn.federated.protocol import masked_broadcast, score_config, statistics_broadcast, unlearn_config
from lightning_unlearn.federated.server import (
    aggregate_scores,
    check_rounds,
    fedavg_aggregate,
    fit_config,
    masked_aggregate,
    pool_batchnorm_moments,
    sample_clients,
    write_batchnorm_statistics,
)
from lightning_unlearn.mask import ParameterMask
from lightning_unlearn.orchestration import apply_reset, prepare
from lightning_unlearn.request import ForgetRequest
from lightning_unlearn.reset import selected_batchnorm_channels

DATA_CHOICES = ("all", "retain")
POLL_S = 0.05  # how often the server asks the SuperLink for replies (Flower's HTTP grid waits 3 s)
#: ``Message.error.code`` of the reply the SuperLink writes for a node it lost (Flower's ``ErrorCode`` is not in its
#: public API; ``tests/test_flower_faults.py`` checks the value against the installed flwr).
NODE_UNAVAILABLE = 5


@dataclass
class FedAvgPlan:
    """The FedAvg schedule (same meaning and defaults as :func:`run_fedavg`)."""

    rounds: int = 3
    local_epochs: int = 1
    fraction: float = 1.0
    seed: int = 0
    data: str = "all"
    local_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rounds(self.rounds)
        check_rounds(self.local_epochs, "local_epochs")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.data not in DATA_CHOICES:
            raise ValueError(f"unknown data {self.data!r}; allowed values are {list(DATA_CHOICES)}")


class UnlearnPlan:
    """One unlearning request: the same :class:`~lightning_unlearn.UnlearnConfig` as :func:`federated_unlearn`,
    plus the number of masked ``rounds``.

    ``overrides`` replace single config fields (``UnlearnPlan(request, ratio=0.2)``). ``evaluate``: after
    each masked round, clients report their local forget/retain accuracy.

    Dropouts: ``min_clients`` (default: every client) is how many clients must answer each masked
    round; ``round_timeout`` (seconds, default: the run's timeout) is how long the server waits for
    the rest. A client that does not answer in time is left out of that and later rounds when at
    least ``min_clients`` answered; with fewer the run stops naming the missing clients.
    """

    def __init__(self, request: ForgetRequest, config: UnlearnConfig | None = None, rounds: int = 1,
                 evaluate: bool = True, min_clients: int | None = None, round_timeout: float | None = None,
                 **overrides: Any) -> None:
        if not isinstance(request, ForgetRequest):
            raise TypeError(f"request must be a ForgetRequest, got {type(request).__name__}")
        check_rounds(rounds)
        if min_clients is not None and (isinstance(min_clients, bool) or not isinstance(min_clients, int)
                                        or min_clients < 1):
            raise ValueError(f"min_clients must be an integer >= 1 or None (every client), got {min_clients!r}")
        if round_timeout is not None and not (isinstance(round_timeout, (int, float)) and round_timeout > 0):
            raise ValueError(f"round_timeout must be a number of seconds > 0 or None, got {round_timeout!r}")
        self.request, self.rounds, self.evaluate = request, rounds, evaluate
        self.min_clients, self.round_timeout = min_clients, round_timeout
        self.config = UnlearnConfig.build(config, **overrides).resolved(request, "federated")

    def key(self) -> str:
        """What a server checkpoint must match to be resumed: request, settings, rounds."""
        return plan_key(self.request.to_dict(), self.config.to_dict(), self.rounds)

    def __repr__(self) -> str:
        return (f"UnlearnPlan(request={self.request.to_dict()}, rounds={self.rounds}, min_clients={self.min_clients}, "
                f"round_timeout={self.round_timeout}, config={self.config})")


@dataclass
class FlowerRunResult:
    """What a Flower run produced: models, mask, per-round rows and bytes (payload and wire)."""

    arrays: dict[str, Tensor] = field(default_factory=dict)  # the final global model
    trained: dict[str, Tensor] = field(default_factory=dict)  # the deployed model (before unlearning)
    clients: dict[int, int] = field(default_factory=dict)  # client id -> Flower node id
    training: list[dict] = field(default_factory=list)
    scores: ChannelScores | None = None
    mask: ParameterMask | None = None
    unlearning: list[dict] = field(default_factory=list)
    evaluation: list[dict] = field(default_factory=list)
    traffic: ByteCounter = field(default_factory=ByteCounter)
    timings_s: dict[str, float] = field(default_factory=dict)
    plan: UnlearnPlan | None = None
    dropped: dict[int, str] = field(default_factory=dict)  # client id -> the round it dropped out in
    resumed: dict[str, Any] = field(default_factory=dict)  # what a restarted server took from its checkpoint

    def round_bytes(self, prefix: str, wire: bool = False) -> list[RoundBytes]:
        """Bytes of every round whose label starts with ``prefix`` (``"fedavg/"``, ``"unlearn/"``, ``"score"``)."""
        book = self.traffic.wire if wire else self.traffic.payload
        return [b for label, b in book.items() if label.startswith(prefix)]

    def report(self) -> UnlearningReport:
        """The same :class:`UnlearningReport` the in-process engines write; metrics are the clients' own."""
        if self.plan is None:
            raise ValueError("this Flower run did not unlearn (no UnlearnPlan): there is nothing to report")
        unlearned = self.evaluation[-1] if self.evaluation else {}
        return UnlearningReport(
            request=self.plan.request.to_dict(), method=self.plan.config.method,
            params={**self.plan.config.to_dict(), "engine": "flower", "rounds": self.plan.rounds},
            seed=self.plan.config.seed, original_sha256=weights_sha256(self.trained),
            unlearned_sha256=weights_sha256(self.arrays),
            metrics={"unlearned": {k: v for k, v in unlearned.items() if k != "round"}},
            timings_s=dict(self.timings_s), mask=UnlearningReport.mask_summary(self.mask),
            bytes_moved=self.traffic.as_dict(),
            extra={"clients": self.clients, "training": self.training, "unlearning": self.unlearning,
                   "evaluation": self.evaluation, "dropped": self.dropped, "resumed": self.resumed},
        )


# -- messaging helpers ---------------------------------------------------------------------------------
def check_replies(replies: Sequence[Message], expected: int, what: str) -> list[Message]:
    """All replies arrived and none is an error; otherwise stop with each failing client's reason."""
    replies = list(replies)
    errors = [m for m in replies if m.has_error()]
    if errors:
        reasons = "; ".join(f"node {m.metadata.src_node_id}: {_short_reason(m.error.reason)}" for m in errors)
        raise RuntimeError(f"{what}: {len(errors)} of {expected} client(s) failed: {reasons}")
    if len(replies) < expected:
        raise RuntimeError(f"{what}: only {len(replies)} of {expected} clients replied before the timeout")
    return replies


def gather(grid: Grid, messages: Iterable[Message], timeout: float | None, poll_s: float = POLL_S) -> list[Message]:
    """Push ``messages`` and pull replies every ``poll_s`` seconds until all arrived or ``timeout`` passed."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
    out: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        out.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return out


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that polls every ``poll_s`` s (Flower's HTTP grid sleeps 3 s)."""

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid, self.poll_s = grid, poll_s

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return gather(self.grid, messages, timeout, self.poll_s)


def _short_reason(reason: str | None) -> str:
    """The exception line of a client's error (Flower sends the whole remote traceback)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", reason or "").splitlines()]
    found = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b.*?: ", ln)]
    return found[-1] if found else (reason or "no reason given")[-500:]


def _send(grid: Grid, contents: Sequence[tuple[int, RecordDict]], message_type: str, timeout: float) -> Iterable[Message]:
    return grid.send_and_receive([Message(c, message_type=message_type, dst_node_id=n) for n, c in contents],
                                 timeout=timeout)


def discover_clients(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Wait for ``num_clients`` nodes and ask each its client id: client id -> node id."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} client nodes connected within {timeout:g}s")
        time.sleep(0.1)
    replies = check_replies(list(_send(grid, [(n, RecordDict()) for n in nodes], "query.hello", timeout)),
                            len(nodes), "hello")
    ids = {int(m.content["metrics"]["client-id"]): m.metadata.src_node_id for m in replies}
    if sorted(ids) != list(range(num_clients)) or len(replies) != num_clients:
        raise RuntimeError(f"client nodes reported ids {sorted(ids)} ({len(replies)} nodes); expected each of "
                           f"0..{num_clients - 1} exactly once (check each node's partition-id)")
    return ids


def _client_replies(replies: Sequence[Message], nodes: Mapping[int, int], traffic: ByteCounter, label: str) -> list:
    """Upward messages in client-id order (aggregation order fixed, as in-process), bytes booked."""
    by_node = {n: c for c, n in nodes.items()}
    out = []
    for m in sorted(replies, key=lambda m: by_node[m.metadata.src_node_id]):
        traffic.up(label, m.content)
        cid = by_node[m.metadata.src_node_id]
        try:
            msg = content_to_reply(m.content)
        except (TypeError, ValueError) as err:  # the record broke the message contract: say which client
            raise type(err)(f"client {cid}: {err}") from None
        if msg is not None:
            out.append((cid, msg))
    return out


def _row(r: int, t0: float, msgs: Sequence[Any], traffic: ByteCounter, label: str) -> dict[str, Any]:
    local = float(sum(m.metrics.get("local_compute_s", 0.0) for m in msgs))
    round_s = time.perf_counter() - t0
    return {"round": r, "clients": len(msgs), "round_s": round_s, "local_compute_s": local, "overhead_s": round_s - local,
            "bytes_down": traffic.payload[label].down, "bytes_up": traffic.payload[label].up,
            "wire_down": traffic.wire[label].down, "wire_up": traffic.wire[label].up}


# -- FedAvg --------------------------------------------------------------------------------------------------
class LightningFedAvg(FedAvg):
    """Flower FedAvg with :func:`run_fedavg`'s sampling, seeds and aggregation, so both engines agree."""

    def __init__(self, clients: Mapping[int, int], plan: FedAvgPlan, traffic: ByteCounter, timeout: float = 3600) -> None:
        super().__init__(fraction_train=plan.fraction, min_train_nodes=1, min_available_nodes=len(clients))
        self.clients, self.plan, self.traffic, self.timeout = dict(clients), plan, traffic, timeout
        self.history: list[dict] = []
        self._t0, self._picked = 0.0, 0
        self._expected: dict[str, Tensor] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r, p = server_round - 1, self.plan
        self._t0 = time.perf_counter()
        global_arrays = record_to_arrays(arrays)
        self._expected = global_arrays  # what every reply must match, key for key and shape for shape
        out = []
        for cid in sample_clients(list(self.clients), p.fraction, p.seed, r):  # the same draw as run_fedavg
            cfg = fit_config(int(cid), r, p.seed, p.local_epochs, p.data, p.local_config)
            content = broadcast_to_content(Broadcast(global_arrays, cfg))
            self.traffic.down(f"fedavg/{r}", content)
            out.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=self.clients[int(cid)]))
        self._picked = len(out)
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r, label = server_round - 1, f"fedavg/{server_round - 1}"
        replies = check_replies(list(replies), self._picked, f"FedAvg round {r}")
        pairs = _client_replies(replies, self.clients, self.traffic, label)
        if not pairs:
            raise ValueError(f"round {r}: no sampled client had data to train on")
        msgs = [m for _, m in pairs]
        new = fedavg_aggregate(msgs, self._expected, senders=[c for c, _ in pairs])
        row = _row(r, self._t0, msgs, self.traffic, label)
        row["clients"] = [c for c, _ in pairs]
        self.history.append(row)
        return arrays_to_record(new), MetricRecord({"local_compute_s": row["local_compute_s"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # training is evaluated by the user's evaluate_fn (server side), as in-process


# -- unlearning -----------------------------------------------------------------------------------------------
class MaskedUnlearning(Strategy):
    """Score, select, then masked rounds: only the selected slices travel and are averaged.

    ``active`` are the clients still taking part: a client that drops out of a round (see
    :class:`UnlearnPlan`'s ``min_clients``) is removed from it for the rest of the run.
    """

    def __init__(self, model: pl.LightningModule, clients: Mapping[int, int], plan: UnlearnPlan, traffic: ByteCounter,
                 timeout: float = 3600) -> None:
        self.model, self.clients, self.plan, self.traffic, self.timeout = model, dict(clients), plan, traffic, timeout
        self.request_json = json.dumps(plan.request.to_dict())
        self.config = unlearn_config(plan.config)
        self.scores: ChannelScores | None = None
        self.mask: ParameterMask | None = None
        self.reference: dict[str, Tensor] = {}
        self.statistics: dict[str, Tensor] | None = None  # after a reset: BatchNorm name -> selected channels
        self.history: list[dict] = []
        self.evaluation: list[dict] = []
        self.active: dict[int, int] = dict(clients)
        self.dropped: dict[int, str] = {}
        self.first_round = 0  # > 0 when resumed: that round re-sends the mask with the current values
        self._t0 = 0.0
        min_clients = plan.min_clients if plan.min_clients is not None else len(self.clients)
        if min_clients > len(self.clients):
            raise ValueError(f"min_clients={min_clients} exceeds the {len(self.clients)} connected clients")
        self.min_clients = min_clients

    def _to_all(self, broadcast: Broadcast, label: str, message_type: str) -> list[Message]:
        content = broadcast_to_content(broadcast, {"request": self.request_json})
        out = []
        for cid in sorted(self.active):
            self.traffic.down(label, content)
            out.append(Message(content, message_type=message_type, dst_node_id=self.active[cid]))
        return out

    def collect(self, grid: Grid, messages: Sequence[Message], what: str) -> list[Message]:
        """Send and wait (``round_timeout``); drop clients that did not answer if ``min_clients`` did.

        A client whose app *raised* stops the run (its reason is repeated): that is a bug or bad data,
        not a dropout, and averaging without it would hide it.
        """
        timeout = self.plan.round_timeout if self.plan.round_timeout is not None else self.timeout
        sent = {m.metadata.dst_node_id for m in messages}
        replies = [m for m in grid.send_and_receive(messages, timeout=timeout)  # the SuperLink's "node gone" = no reply
                   if not (m.has_error() and m.error.code == NODE_UNAVAILABLE)]
        check_replies(replies, len(replies), what)  # raises on a client that failed
        answered = {m.metadata.src_node_id for m in replies}
        missing = sorted(c for c, n in self.active.items() if n in sent and n not in answered)
        if missing:
            if len(answered) < self.min_clients:
                raise RuntimeError(
                    f"{what}: only {len(answered)} of {len(sent)} clients replied within {timeout:g}s (missing clients "
                    f"{missing}); min_clients={self.min_clients}, so the run stops rather than average fewer clients")
            log(WARNING, "%s: clients %s did not reply within %gs; continuing with the %d that did (min_clients=%d)",
                what, missing, timeout, len(answered), self.min_clients)
            for c in missing:
                self.dropped[c] = what
                self.active.pop(c, None)
        return replies

    def select(self, grid: Grid, deployed: Mapping[str, Tensor]) -> ParameterMask:
        """Scoring round: clients with forget data send (scores, count); the server selects the mask."""
        c = self.plan.config
        msgs = self._to_all(Broadcast({}, score_config(c)), "score", "query.score")
        replies = check_replies(list(grid.send_and_receive(msgs, timeout=self.timeout)), len(msgs), "scoring")
        pairs = _client_replies(replies, self.clients, self.traffic, "score")
        self.scores = aggregate_scores([m for _, m in pairs], senders=[c for c, _ in pairs], model=self.model)
        self.reference = {k: v.clone() for k, v in deployed.items()}
        set_arrays(self.model, self.reference)
        self.mask = prepare(self.model, self.scores, c)  # the shared orchestration, as in-process and centrally
        return self.mask

    def remove(self, grid: Grid) -> None:
        """``config.reset``: reset the selected slices of the global model and re-estimate the selected BatchNorm
        channels' statistics with one round (as :func:`~lightning_unlearn.federated.protocol.remove_selected`)."""
        c = self.plan.config
        if c.reset == "none":
            return
        set_arrays(self.model, self.reference)
        self.statistics = apply_reset(self.model, self.mask, c).batchnorm_channels
        if self.statistics:
            msgs = self._to_all(statistics_broadcast(self.model, self.mask, c), "bn_stats", "query.bn_stats")
            pairs = _client_replies(self.collect(grid, msgs, "statistics round"), self.clients, self.traffic, "bn_stats")
            write_batchnorm_statistics(self.model, self.statistics, pool_batchnorm_moments(
                [m for _, m in pairs], self.statistics, senders=[i for i, _ in pairs]))
        self.reference = get_arrays(self.model)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r = server_round - 1
        self._t0 = time.perf_counter()
        first = r == self.first_round  # the clients learn the mask here (again, after a server restart)
        down = masked_broadcast(record_to_arrays(arrays), self.mask, self.config, r, first, self.statistics)
        return self._to_all(down, f"unlearn/{r}", "train.unlearn")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r, label = server_round - 1, f"unlearn/{server_round - 1}"
        replies = check_replies(list(replies), len(self.active), f"unlearning round {r}")
        pairs = _client_replies(replies, self.clients, self.traffic, label)
        msgs = [m for _, m in pairs]
        if not msgs:
            raise ValueError("no client has retain data for the masked rounds")
        current = masked_aggregate(self.reference, self.mask, msgs, senders=[c for c, _ in pairs])
        row = _row(r, self._t0, msgs, self.traffic, label)
        row["dropped"] = sorted(c for c, what in self.dropped.items() if what == f"unlearning round {r}")
        self.history.append(row)
        return arrays_to_record(current), MetricRecord({"local_compute_s": self.history[-1]["local_compute_s"]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.plan.evaluate:
            return []
        return self._to_all(Broadcast(record_to_arrays(arrays), {}), f"evaluate/{server_round - 1}", MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.plan.evaluate:
            return None
        replies = check_replies(list(replies), len(self.active), f"evaluation round {server_round - 1}")
        by_node = {n: c for c, n in self.clients.items()}
        for m in replies:
            self.traffic.up(f"evaluate/{server_round - 1}", m.content)
            check_metrics(dict(m.content["metrics"]), f"client {by_node[m.metadata.src_node_id]}", "evaluation reply")
        row: dict[str, float] = {"round": server_round - 1}
        for split in ("forget", "retain"):
            pairs = [(m.content["metrics"][f"{split}-acc"], m.content["metrics"][f"{split}-examples"])
                     for m in replies if f"{split}-acc" in m.content["metrics"]]
            n = sum(c for _, c in pairs)
            row[f"{split}_acc"] = sum(a * c for a, c in pairs) / n if n else math.nan
        self.evaluation.append(row)
        return MetricRecord({k: float(v) for k, v in row.items() if not math.isnan(v)})

    def summary(self) -> None:
        p, c = self.plan, self.plan.config
        log(INFO, "\t├──> request %s, scoring %s, ratio %g (%s)", p.request.to_dict(), c.method, c.ratio, c.scope)
        log(INFO, "\t└──> %d masked round(s), objective %s, max_steps %s", p.rounds, c.objective, c.max_steps)

    def run(self, grid: Grid, deployed: Mapping[str, Tensor], checkpoint: "_Checkpointer | None" = None) -> dict[str, Tensor]:
        """Select the mask (or take it from ``checkpoint``), run the masked rounds; returns the unlearned arrays."""
        state = checkpoint.state if checkpoint is not None else None
        if state is not None and state.mask is not None:
            self.mask, self.first_round = state.mask, state.rounds_done
            self.reference = {k: v.clone() for k, v in deployed.items()}
            self.history, self.evaluation = list(state.unlearning), list(state.evaluation)
            current = dict(state.current) if state.current is not None else dict(self.reference)
            log(INFO, "resuming unlearning at round %d with the checkpoint's mask (sha256 %s)", self.first_round,
                self.mask.sha256()[:12])
            if self.plan.config.reset != "none":
                if state.current is None:  # stopped before the reset was saved: redo it (seeded, the same values)
                    self.remove(grid)
                    current = dict(self.reference)
                else:  # the saved arrays hold the reset (and its statistics) outside the trained slices
                    self.statistics = selected_batchnorm_channels(self.model, self.mask)
                    self.reference = dict(current)
        else:
            self.select(grid, deployed)
            self.remove(grid)
            current = dict(self.reference)
            if checkpoint is not None:
                checkpoint.update(mask=self.mask, rounds_done=0,
                                  current=current if self.plan.config.reset != "none" else None)
        self.summary()
        for r in range(self.first_round, self.plan.rounds):
            log(INFO, "[UNLEARNING ROUND %d/%d]", r + 1, self.plan.rounds)
            msgs = list(self.configure_train(r + 1, arrays_to_record(current), ConfigRecord(), grid))
            replies = self.collect(grid, msgs, f"unlearning round {r}")
            record, _ = self.aggregate_train(r + 1, replies)
            current = record_to_arrays(record)
            msgs = list(self.configure_evaluate(r + 1, record, ConfigRecord(), grid))
            if msgs:
                self.aggregate_evaluate(r + 1, self.collect(grid, msgs, f"evaluation round {r}"))
            if checkpoint is not None:
                checkpoint.update(rounds_done=r + 1, current=current, unlearning=self.history, evaluation=self.evaluation)
        return current


# -- the workflow and the app ------------------------------------------------------------------------------------
def deploy(grid: Grid, clients: Mapping[int, int], arrays: Mapping[str, Tensor], traffic: ByteCounter,
           timeout: float = 3600) -> None:
    """Every client keeps the global model: the reference its masked rounds start from."""
    content = broadcast_to_content(Broadcast(arrays))
    for _ in clients:
        traffic.down("deploy", content)
    replies = _send(grid, [(clients[c], content) for c in sorted(clients)], "query.deploy", timeout)
    for m in check_replies(list(replies), len(clients), "deploy"):
        traffic.up("deploy", m.content)


def run_server(
    grid: Grid,
    model: pl.LightningModule,
    num_clients: int,
    train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None,
    timeout: float = 3600,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    poll_s: float | None = POLL_S,
) -> FlowerRunResult:
    """FedAvg from ``model``'s arrays (skipped when ``train`` is None), deploy, then unlearn (when asked).

    ``checkpoint``: a folder for the :class:`ServerCheckpoint`; a restarted run with the same plans
    resumes from it (no retraining, the same mask, the next masked round). ``poll_s``: how often to
    ask the SuperLink for replies (None: the grid's own ``send_and_receive``, 3 s in a deployment).
    """
    result = FlowerRunResult()
    if poll_s is not None:
        grid = PollingGrid(grid, poll_s)
    saver = _Checkpointer(checkpoint, plan_key(train.__dict__ if train else None, unlearn.key() if unlearn else None,
                                               num_clients)) if checkpoint is not None else None
    state = saver.state if saver is not None else None
    t0 = time.perf_counter()
    result.clients = discover_clients(grid, num_clients, timeout)
    arrays = get_arrays(model)
    t1 = time.perf_counter()
    if state is not None and state.trained is not None:
        arrays, result.training = {k: v.clone() for k, v in state.trained.items()}, list(state.training)
        result.resumed = {"trained": True, "mask": state.mask is not None, "rounds_done": state.rounds_done}
        log(INFO, "resuming from checkpoint %s: %s", checkpoint, result.resumed)
    elif train is not None:
        strategy = LightningFedAvg(result.clients, train, result.traffic, timeout)
        out = strategy.start(grid, arrays_to_record(arrays), num_rounds=train.rounds, timeout=timeout,
                             evaluate_fn=evaluate_fn)
        arrays, result.training = record_to_arrays(out.arrays), strategy.history
    t2 = time.perf_counter()
    result.trained = {k: v.clone() for k, v in arrays.items()}
    if saver is not None and (state is None or state.trained is None):
        saver.update(trained=result.trained, training=result.training)
    deploy(grid, result.clients, arrays, result.traffic, timeout)
    t3 = time.perf_counter()
    if unlearn is not None:
        strategy = MaskedUnlearning(model, result.clients, unlearn, result.traffic, timeout)
        arrays = strategy.run(grid, arrays, saver)
        result.scores, result.mask = strategy.scores, strategy.mask
        result.unlearning, result.evaluation = strategy.history, strategy.evaluation
        result.dropped = dict(strategy.dropped)
    t4 = time.perf_counter()
    result.plan = unlearn
    set_arrays(model, arrays)
    result.arrays = arrays
    result.timings_s = {"connect": t1 - t0, "training": t2 - t1, "deploy": t3 - t2, "unlearning": t4 - t3,
                        "total": t4 - t0}
    return result


class _Checkpointer:
    """Holds the run's :class:`ServerCheckpoint` (loaded if one exists for this plan) and rewrites it."""

    def __init__(self, folder: str | os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        self.state = ServerCheckpoint.load(self.folder, key)
        self._current = self.state or ServerCheckpoint(key)

    def update(self, **fields: Any) -> None:
        self._current.__dict__.update(fields)
        self._current.save(self.folder)


def save_result(result: FlowerRunResult, out_dir: str | os.PathLike) -> Path:
    """``model.pt`` (final arrays), ``trained.pt`` and (after unlearning) ``mask.pt`` and ``report.json``, an
    :class:`UnlearningReport`, under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    for name, arrays in (("model.pt", result.arrays), ("trained.pt", result.trained)):
        save_torch(arrays, out / name)
    if result.mask is not None:
        result.mask.save(out / "mask.pt")
    if result.plan is not None:
        write_json(result.report().to_dict(), out / "report.json")
    return out


def make_server_app(
    model_fn: Callable[[], pl.LightningModule],
    num_clients: int,
    train: FedAvgPlan | None = None,
    unlearn: UnlearnPlan | None = None,
    sink: FlowerRunResult | None = None,
    out_dir: str | os.PathLike | None = None,
    timeout: float = 3600,
) -> ServerApp:
    """A ServerApp running :func:`run_server`; results go to ``sink`` (same process) and/or ``out_dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, model_fn(), num_clients, train, unlearn, timeout)
        if sink is not None:
            sink.__dict__.update(result.__dict__)
        if out_dir is not None:
            save_result(result, out_dir)

    return app


__all__ = ["FedAvgPlan", "FlowerRunResult", "LightningFedAvg", "MaskedUnlearning", "UnlearnPlan", "check_replies",
           "deploy", "discover_clients", "make_server_app", "run_server", "save_result"]
