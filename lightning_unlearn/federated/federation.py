"""The server's handle on a federation: whichever ``Grid`` it runs on, the same sending, checking and counting."""
from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any, Iterable, Mapping, Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from lightning_unlearn.federated.grid import LocalGrid, new_message
from lightning_unlearn.federated.messages import ByteCounter, Reply, RoundBytes, payload_bytes, read_reply
from lightning_unlearn.federated.server import check_rounds
from lightning_unlearn.request import ForgetRequest

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the server asks the SuperLink for replies (Flower's HTTP grid waits 3 s)
#: ``Message.error.code`` of the reply the SuperLink writes for a node it lost (Flower's ``ErrorCode`` is not in its
#: public API; ``tests/test_flower_faults.py`` checks the value against the installed flwr).
NODE_UNAVAILABLE = 5


class PollingGrid:
    """``grid`` (any Grid) whose ``send_and_receive`` pulls replies every ``poll_s`` s instead of Flower's 3 s until
    all arrived or ``timeout`` passed; every other attribute is the wrapped grid's."""

    def __init__(self, grid: Grid, poll_s: float = POLL_S) -> None:
        self.grid, self.poll_s = grid, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending, out = set(self.grid.push_messages(messages)), []
        deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        while pending:
            out.extend(got := list(self.grid.pull_messages(pending)))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        return out


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


def _short_reason(reason: str | None) -> str:
    """The exception line of a client's error (Flower sends the whole remote traceback)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", reason or "").splitlines()]
    found = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b.*?: ", ln)]
    return found[-1] if found else (reason or "no reason given")[-500:]


def discover_clients(grid: Grid, num_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Wait for ``num_clients`` nodes and ask each its client id: client id -> node id."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} client nodes connected within {timeout:g}s")
        time.sleep(0.1)
    messages = [new_message(grid, RecordDict(), "query.hello", n) for n in nodes]
    replies = check_replies(grid.send_and_receive(messages, timeout=timeout), len(nodes), "hello")
    ids = {int(m.content["metrics"]["client-id"]): m.metadata.src_node_id for m in replies}
    if sorted(ids) != list(range(num_clients)) or len(replies) != num_clients:
        raise RuntimeError(f"client nodes reported ids {sorted(ids)} ({len(replies)} nodes); expected each of "
                           f"0..{num_clients - 1} exactly once (check each node's partition-id)")
    return ids


class Federation:
    """The server's view of ``num_clients`` client nodes on ``grid``: replies in client-id order, payload and wire
    bytes per round label. A client that raised stops the run; one silent for ``round_timeout`` is dropped from
    rounds that tolerate dropouts while ``min_clients`` answer. ``request`` travels in every message's config."""

    def __init__(self, grid: Grid, num_clients: int, timeout: float = 3600, min_clients: int | None = None,
                 round_timeout: float | None = None, poll_s: float | None = POLL_S) -> None:
        if poll_s is not None and not isinstance(grid, LocalGrid):  # a LocalGrid answers at once: nothing to poll
            grid = PollingGrid(grid, poll_s)
        self.grid, self.timeout, self.round_timeout = grid, timeout, round_timeout
        self.min_clients = num_clients if min_clients is None else min_clients
        check_rounds(self.min_clients, "min_clients")
        if self.min_clients > num_clients:
            raise ValueError(f"min_clients={self.min_clients} exceeds the {num_clients} connected clients")
        self.nodes = discover_clients(grid, num_clients, timeout)
        self.active = dict(self.nodes)
        self.dropped: dict[int, str] = {}  # client id -> the round it dropped out in
        self.traffic = ByteCounter()  # every byte this federation moved, per round label
        self.run = ByteCounter()  # the current run's bytes (start_run): what its rows and totals report
        self.request: ForgetRequest | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    def start_run(self) -> None:
        """Count a new run's bytes from zero: runs on one federation share round labels (``score``, ``unlearn/0``)."""
        self.run = ByteCounter()

    def book(self, label: str, content: RecordDict, direction: str) -> None:
        """Count one message's bytes (``direction``: ``"down"`` or ``"up"``) for the federation and the run."""
        payload, wire = payload_bytes(content), sum(r.count_bytes() for r in content.values())  # Flower's size
        for counter in (self.traffic, self.run):
            counter.count(label, direction, payload, wire)

    def message(self, cid: int, content: RecordDict, message_type: str, label: str) -> Message:
        """Client ``cid``'s message (a ``down``; the request joins its config), its bytes booked under ``label``."""
        if self.request is not None:
            content["config"]["request"] = json.dumps(self.request.to_dict())
        self.book(label, content, "down")
        return new_message(self.grid, content, message_type, self.nodes[cid], group_id=label)

    def ask(self, contents: RecordDict | Mapping[int, RecordDict], message_type: str, label: str,
            dropouts: bool = False, what: str | None = None) -> list[Reply]:
        """Send one round (one content for every active client, or one per client id) and return the replies in
        client-id order (empty replies left out)."""
        if isinstance(contents, RecordDict):
            contents = {cid: contents for cid in sorted(self.active)}
        messages = [self.message(cid, c, message_type, label) for cid, c in sorted(contents.items())]
        return self.decode(self.receive(messages, what or label, dropouts), label)

    def receive(self, messages: Sequence[Message], what: str, dropouts: bool = False) -> list[Message]:
        """Send ``messages`` and return the replies: a failed client raises, a missing one is dropped (:meth:`ask`)."""
        timeout = self.round_timeout if dropouts and self.round_timeout is not None else self.timeout
        replies = [m for m in self.grid.send_and_receive(messages, timeout=timeout)  # "node gone" = no reply
                   if not (m.has_error() and m.error.code == NODE_UNAVAILABLE)]
        check_replies(replies, len(replies), what)  # raises on a client that failed
        sent = {m.metadata.dst_node_id for m in messages}
        answered = {m.metadata.src_node_id for m in replies}
        missing = sorted(c for c, n in self.nodes.items() if n in sent and n not in answered)
        if missing and (not dropouts or len(answered) < self.min_clients):
            raise RuntimeError(
                f"{what}: only {len(answered)} of {len(sent)} clients replied within {timeout:g}s (missing clients "
                f"{missing}); min_clients={self.min_clients}, so the run stops rather than average fewer clients")
        if missing:
            log.warning("%s: clients %s did not reply within %gs; continuing with the %d that did (min_clients=%d)",
                        what, missing, timeout, len(answered), self.min_clients)
        for c in missing:
            self.dropped[c] = what
            self.active.pop(c, None)
        return replies

    def decode(self, replies: Sequence[Message], label: str) -> list[Reply]:
        """Replies read at the trust boundary in client-id order, bytes booked; a broken contract names the client."""
        by_node = {n: c for c, n in self.nodes.items()}
        out = []
        for m in sorted(replies, key=lambda m: by_node[m.metadata.src_node_id]):
            self.book(label, m.content, "up")
            cid = by_node[m.metadata.src_node_id]
            if (reply := read_reply(m.content, cid)) is not None:
                out.append(reply)
        return out

    def row(self, r: int, t0: float, msgs: Sequence[Reply], label: str) -> dict[str, Any]:
        """One round's history row: clients that replied, times and bytes (payload and wire)."""
        local = float(sum(m.metrics.get("local_compute_s", 0.0) for m in msgs))
        round_s = time.perf_counter() - t0
        pay, wire = (book.get(label, RoundBytes()) for book in (self.run.payload, self.run.wire))
        return {"round": r, "clients": len(msgs), "round_s": round_s, "local_compute_s": local,
                "overhead_s": round_s - local, "bytes_down": pay.down, "bytes_up": pay.up,
                "wire_down": wire.down, "wire_up": wire.up}


def as_federation(clients: Any) -> Federation:
    """A :class:`Federation` as it is, or a fresh one over in-process clients (anything with ``grid`` and a length)."""
    if isinstance(clients, Federation):
        return clients
    if hasattr(clients, "grid"):
        return Federation(clients.grid, len(clients))
    raise TypeError(f"expected a Federation or the in-process clients of a FederatedSimulation, got "
                    f"{type(clients).__name__}")
