"""``flower-supernode`` that asks the SuperLink for messages more often (``--poll-interval``).

Flower 1.41's SuperNode pulls the SuperLink for new messages and, when there is none, sleeps a
hard-coded 3 s (and 0.5 s between checks for a finished reply). A federated round therefore waits
up to 3 s before a node even sees its message: for unlearning's short rounds (a few local steps)
that wait dominates. This wrapper runs Flower's own ``flower-supernode`` unchanged, with those
sleeps capped at ``--poll-interval`` seconds (default 0.1):

    python -m lightning_unlearn.federated.flower.supernode --poll-interval 0.1 --insecure \
        --superlink 127.0.0.1:8000 --isolation process --port 9094 --node-config "data-path='...'"

Every other argument goes to ``flower-supernode`` as is. The cost is more pull requests to the
SuperLink (one per node per ``--poll-interval`` while idle): fine for tens of nodes, keep Flower's
default (``--poll-interval 3``) for thousands.
"""
from __future__ import annotations

import sys
import time
import types
from typing import Sequence

FLOWER_IDLE_SLEEP_S = 3.0


class CappedClock(types.SimpleNamespace):
    """The ``time`` module with ``sleep`` capped at ``limit_s`` (every other attribute is ``time``'s own)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(limit_s=float(limit_s))

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.limit_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch_poll_interval(limit_s: float) -> None:
    """Cap the SuperNode loop's sleeps (``flwr.supernode.start_client_internal``) at ``limit_s`` seconds."""
    if not 0.01 <= limit_s <= FLOWER_IDLE_SLEEP_S:
        raise ValueError(f"--poll-interval must be in [0.01, {FLOWER_IDLE_SLEEP_S:g}] seconds, got {limit_s!r}")
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time and not isinstance(getattr(loop, "time", None), CappedClock):
        raise RuntimeError("this flwr version's SuperNode loop no longer uses module `time`; "
                           "run flower-supernode directly (the poll interval cannot be changed)")
    loop.time = CappedClock(limit_s)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    limit = 0.1
    if "--poll-interval" in args:
        i = args.index("--poll-interval")
        try:
            limit = float(args[i + 1])
        except (IndexError, ValueError):
            print("lightning_unlearn.federated.flower.supernode: error: --poll-interval needs a number of seconds",
                  file=sys.stderr)
            raise SystemExit(2) from None
        del args[i:i + 2]
    try:
        patch_poll_interval(limit)
    except ValueError as err:
        print(f"lightning_unlearn.federated.flower.supernode: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode.cli import flower_supernode

    from lightning_unlearn.federated.flower.warm_executor import patch_pull_backoff

    patch_pull_backoff()  # the node downloads a message's objects as soon as the server has pushed them

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
