"""What crossed the client/server boundary of an in-process run, decoded into the library's messages."""
from __future__ import annotations

from typing import Any

from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.messages import content_to_broadcast, content_to_reply


def recording(clients: Any) -> LocalGrid:
    """Start recording every exchange on the in-process clients' grid (a fresh log)."""
    clients.grid.record, clients.grid.log = True, []
    return clients.grid


def exchanges(grid: LocalGrid) -> list[tuple[str, int, str, Any]]:
    """``(direction, client id, message type, message)`` in order: each Broadcast down, each upward message up
    (empty replies and the handshake's / evaluation's metric records left out)."""
    out = []
    for cid, op, message, reply in grid.log:
        out.append(("down", cid, op, content_to_broadcast(message.content)[0]))
        if "reply" in reply.content and (up := content_to_reply(reply.content)) is not None:
            out.append(("up", cid, op, up))
    return out
