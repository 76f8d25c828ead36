"""What crossed the client/server boundary of an in-process run, read back as the client and the server read it."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.messages import payload_bytes, read_down, read_reply


def recording(clients: Any) -> LocalGrid:
    """Start recording every exchange on the in-process clients' grid (a fresh log)."""
    clients.grid.record, clients.grid.log = True, []
    return clients.grid


def down_message(content) -> SimpleNamespace:
    """A server -> client message: its ``arrays``, ``config``, ``channels`` and payload bytes (``nbytes``)."""
    arrays, config, channels = read_down(content)
    return SimpleNamespace(arrays=arrays, config=config, channels=channels, nbytes=payload_bytes(content))


def exchanges(grid: LocalGrid) -> list[tuple[str, int, str, Any]]:
    """``(direction, client id, message type, message)`` in order: each down message, each reply up as a
    :class:`~lightning_unlearn.federated.messages.Reply` (empty replies and the handshake's / evaluation's metric
    records left out)."""
    out = []
    for cid, op, message, reply in grid.log:
        out.append(("down", cid, op, down_message(message.content)))
        if "reply" in reply.content and (up := read_reply(reply.content, f"client {cid}")) is not None:
            out.append(("up", cid, op, up))
    return out
