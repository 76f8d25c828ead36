"""An in-process Flower ``Grid``: the server's messages are answered by a ``ClientApp`` in this process. Outside a
Flower run ``Message(content, dst_node_id=...)`` raises, so server code builds messages with :func:`new_message`."""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterable, Mapping

from flwr.app import DEFAULT_TTL, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

SERVER_NODE_ID = 1  # the SuperLink's node id in a Flower run
FIRST_NODE_ID = 1_000  # node ids of the local clients: FIRST_NODE_ID + partition id


class LocalGrid(Grid):
    """``num_nodes`` nodes in this process, node ``FIRST_NODE_ID + k`` with ``node_config["partition-id"] = k``;
    ``run_config`` is every node's ``context.run_config``. A ClientApp error is raised here, where it happened;
    with ``record = True`` every exchange is kept in ``log`` as ``(partition id, message type, message, reply)``."""

    def __init__(self, app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        self.app, self.run_id, self._run, self.record, self.log = app, 1, None, False, []
        self.contexts = {
            FIRST_NODE_ID + k: Context(self.run_id, FIRST_NODE_ID + k, {"partition-id": k, "num-partitions": num_nodes},
                                       RecordDict(), dict(run_config or {}))
            for k in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message from the server to ``dst_node_id``, with its id set (the SuperLink's job in a deployment)."""
        return Message(content, metadata=Metadata(
            run_id=self.run_id, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE_ID, dst_node_id=dst_node_id,
            reply_to_message_id="", group_id=group_id, created_at=time.time(), ttl=ttl or DEFAULT_TTL,
            message_type=message_type))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._pending.update((m.metadata.message_id, m) for m in messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp on each pending message (in push order) and return its replies."""
        wanted, replies = set(message_ids), []
        for message in [self._pending.pop(i) for i in list(self._pending) if i in wanted]:
            context = self.contexts[message.metadata.dst_node_id]
            replies.append(reply := self.app(message, context))
            if self.record:
                self.log.append((context.node_config["partition-id"], message.metadata.message_type, message, reply))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def new_message(grid: Grid, content: RecordDict, message_type: str, dst_node_id: int, group_id: str = "") -> Message:
    """A server -> client message that works on every grid (see the module docstring)."""
    if isinstance(grid, LocalGrid):
        return grid.create_message(content, message_type, dst_node_id, group_id)
    return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


__all__ = ["FIRST_NODE_ID", "LocalGrid", "new_message"]
