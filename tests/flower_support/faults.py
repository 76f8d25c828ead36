"""A Flower client mod that kills a node: the server's crash-and-resume tests."""
from __future__ import annotations

from typing import Callable

NODE_DIED = "the node died"


def die_at(message_type: str, n: int | None) -> Callable:
    """A mod that raises on the ``n``-th message of ``message_type`` the ClientApp receives (None: never)."""
    seen: list[str] = []

    def mod(message, context, call_next):
        seen.append(message.metadata.message_type)
        if seen.count(message_type) == n:
            raise RuntimeError(NODE_DIED)
        return call_next(message, context)

    return mod
