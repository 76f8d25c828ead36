"""Fault handling of the Flower server, without processes: dropouts vs min_clients, checkpoints, polling knobs."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from lightning_unlearn import ForgetRequest
from lightning_unlearn.scoring import discover_layers
from lightning_unlearn.federated.flower import UnlearnPlan
from lightning_unlearn.federated.checkpoint import STATE_FILE, ServerCheckpoint
from lightning_unlearn.federated.federation import NODE_UNAVAILABLE, Federation, PollingGrid
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.mask import ParameterMask

sys.path.insert(0, str(Path(__file__).resolve().parent / "flower_support"))  # the tests' Flower speed-ups
from fast_supernode import CappedClock, patch_poll_interval  # noqa: E402

NODES = {0: 11, 1: 12, 2: 13}
MESSAGES = LocalGrid(ClientApp(), 1)  # builds server messages outside a Flower run (public metadata)


def _message(node: int, message_type: str = "train.unlearn") -> Message:
    return MESSAGES.create_message(RecordDict(), message_type, node, "")


class FakeGrid(LocalGrid):
    """Replies come from ``answer(message) -> Message | None`` (None: that node never answers); every node
    answers the handshake with its client id. A LocalGrid only for its message ids: pushing and pulling are
    this class's own, with replies that may come late or never."""

    def __init__(self, answer, delay_s: float = 0.0) -> None:
        super().__init__(ClientApp(), len(NODES))
        self.answer, self.delay_s, self.sent, self.pulls = answer, delay_s, {}, 0
        self._t0 = 0.0

    def push_messages(self, messages):
        messages = list(messages)
        ids = [m.metadata.message_id for m in messages]
        self.sent.update({m.metadata.message_id: m for m in messages})
        self._t0 = time.monotonic()
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        if time.monotonic() - self._t0 < self.delay_s:
            return []
        return [r for i in list(ids) if (r := self._answer(self.sent[i])) is not None]

    def _answer(self, message):
        if message.metadata.message_type == "query.hello":
            cid = {n: c for c, n in NODES.items()}[message.metadata.dst_node_id]
            return Message(RecordDict({"metrics": MetricRecord({"client-id": cid})}), reply_to=message)
        return self.answer(message)

    def get_node_ids(self):
        return list(NODES.values())


def _reply(message: Message) -> Message:
    return Message(RecordDict(), reply_to=message)  # from the node the message went to


def _federation(answer, min_clients=None, round_timeout=0.3) -> Federation:
    return Federation(FakeGrid(answer), len(NODES), timeout=5, min_clients=min_clients, round_timeout=round_timeout,
                      poll_s=0.01)


def _messages(fed: Federation) -> list[Message]:
    return [_message(n) for n in fed.active.values()]


def test_dropout_below_min_clients_stops_with_the_missing_clients():
    fed = _federation(lambda m: None if m.metadata.dst_node_id == 13 else _reply(m))  # every client must answer
    with pytest.raises(RuntimeError, match=r"unlearning round 0: only 2 of 3 clients replied within 0.3s \(missing "
                                           r"clients \[2\]\); min_clients=3, so the run stops rather than average"):
        fed.receive(_messages(fed), "unlearning round 0", dropouts=True)


def test_dropout_at_or_above_min_clients_goes_on_without_the_client():
    gone = lambda m: Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node gone"), reply_to=m)  # noqa: E731
    fed = _federation(lambda m: gone(m) if m.metadata.dst_node_id == 12 else _reply(m), min_clients=2)
    replies = fed.receive(_messages(fed), "unlearning round 0", dropouts=True)
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 13]
    assert fed.dropped == {1: "unlearning round 0"} and sorted(fed.active) == [0, 2]
    assert len(_messages(fed)) == 2  # later rounds go to the remaining clients only
    # a client whose app *failed* is not a dropout: the run stops with its reason
    failed = _federation(lambda m: Message(Error(code=0, reason="ValueError: bad shard"), reply_to=m), min_clients=2)
    with pytest.raises(RuntimeError, match=r"evaluation round 0: 3 of 3 client\(s\) failed: node 11: ValueError: bad"):
        failed.receive(_messages(failed), "evaluation round 0", dropouts=True)


def test_min_clients_is_checked_before_any_round():
    with pytest.raises(ValueError, match="min_clients must be an integer >= 1, got 0"):
        _federation(_reply, min_clients=0)
    with pytest.raises(ValueError, match="round_timeout must be a number of seconds > 0"):
        UnlearnPlan(ForgetRequest(classes=[3]), round_timeout=-1)
    with pytest.raises(ValueError, match="min_clients=4 exceeds the 3 connected clients"):
        _federation(_reply, min_clients=4)


def test_gather_polls_until_all_replies_or_the_timeout():
    slow = FakeGrid(_reply, delay_s=0.2)
    msgs = [_message(n, "query.x") for n in NODES.values()]
    t0 = time.monotonic()
    assert len(PollingGrid(slow, 0.02).send_and_receive(msgs, timeout=5)) == 3
    assert time.monotonic() - t0 < 2 and slow.pulls > 3  # returned soon after the replies, not after a 3 s sleep
    never = FakeGrid(lambda m: None)
    t0 = time.monotonic()
    assert PollingGrid(never, 0.02).send_and_receive([_message(11, "query.x")], timeout=0.2) == []
    assert 0.2 <= time.monotonic() - t0 < 2


def test_checkpoint_round_trip_and_refuses_another_plan(tmp_path):
    model = SmallCNN()
    mask = ParameterMask.from_channels(model, {"conv1": [0, 2]}, discover_layers(model, torch.zeros(1, 1, 8, 8)))
    arrays = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    key = {"train": "a", "unlearn": "b"}
    ServerCheckpoint(tmp_path, key).update(trained=arrays, training=[{"round": 0}], mask=mask, rounds_done=1,
                                           current=arrays, unlearning=[{"round": 0, "clients": 3}])
    back = ServerCheckpoint.open(tmp_path, key)
    assert back.rounds_done == 1 and back.unlearning == [{"round": 0, "clients": 3}]
    assert all(torch.equal(back.trained[k], v) for k, v in arrays.items())
    assert back.mask.sha256() == mask.sha256() and back.training == [{"round": 0}]
    fresh = ServerCheckpoint.open(tmp_path / "empty", key)
    assert fresh.trained is None and fresh.mask is None and fresh.training == []
    assert ServerCheckpoint.open(tmp_path, {"train": "a", "unlearn": "c"}, resume=False).mask is None
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / STATE_FILE))} was written by a different run "
                                         r"\(unlearn changed\); start fresh .* or use another checkpoint folder$"):
        ServerCheckpoint.open(tmp_path, {"train": "a", "unlearn": "c"})
    (tmp_path / "old").mkdir()
    torch.save({"key": "a single hash"}, tmp_path / "old" / STATE_FILE)  # an earlier version's file
    with pytest.raises(ValueError, match=r"is no server state of this lightning-unlearn version; remove it"):
        ServerCheckpoint.open(tmp_path / "old", key)
    assert UnlearnPlan(ForgetRequest(classes=[3])).key() != UnlearnPlan(ForgetRequest(classes=[4])).key()
    assert UnlearnPlan(ForgetRequest(classes=[3])).key() == UnlearnPlan(ForgetRequest(classes=[3])).key()


def test_node_unavailable_is_flowers_code():
    """The package keeps Flower's (non-public) error code for a lost node as a constant: it must match this flwr."""
    assert NODE_UNAVAILABLE == ErrorCode.NODE_UNAVAILABLE


def test_supernode_poll_interval(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    with pytest.raises(ValueError, match=r"--poll-interval must be in \[0.01, 3\] seconds, got 5"):
        patch_poll_interval(5)
    patch_poll_interval(0.05)
    assert isinstance(loop.time, CappedClock) and loop.time.monotonic() > 0
    t0 = time.monotonic()
    loop.time.sleep(3)  # Flower's idle sleep, capped
    assert time.monotonic() - t0 < 1
