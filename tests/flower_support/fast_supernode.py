"""``flower-supernode`` that asks the SuperLink for messages more often (``--poll-interval``), for the
tests and benchmarks.

Not part of the package: it patches Flower's SuperNode loop (its module ``time``) and the keyword
defaults of its object download, internals that can change in any flwr release; pyproject pins flwr
to the versions it was tested with.

Flower 1.41's SuperNode pulls the SuperLink for new messages and, when there is none, sleeps a
hard-coded 3 s (and 0.5 s between checks for a finished reply). A federated round therefore waits
up to 3 s before a node even sees its message: for unlearning's short rounds (a few local steps)
that wait dominates. This wrapper runs Flower's own ``flower-supernode`` unchanged, with those
sleeps capped at ``--poll-interval`` seconds (default 0.1):

    python tests/flower_support/fast_supernode.py --poll-interval 0.1 --insecure \
        --superlink 127.0.0.1:8000 --isolation process --port 9094 --node-config "data-path='...'"

Every other argument goes to ``flower-supernode`` as is. The cost is more pull requests to the
SuperLink (one per node per ``--poll-interval`` while idle): fine for tens of nodes, keep Flower's
default (``--poll-interval 3``) for thousands.

This module imports only Flower, never torch or lightning-unlearn, so that a SuperNode starts in
about a second.
"""
from __future__ import annotations

import logging
import sys
import time
import types
from typing import Sequence

FLOWER_IDLE_SLEEP_S = 3.0
log = logging.getLogger(__name__)


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


def patch_pull_backoff(initial_s: float = 0.05, cap_s: float = 1.0) -> None:
    """Re-ask for message objects after ``initial_s`` (doubling up to ``cap_s``) instead of Flower's 1 s (up to 10 s).

    A task forked within milliseconds of being created often asks its SuperNode for the message
    before the SuperNode has finished downloading it from the SuperLink; Flower then backs off a
    full second. Only this process (and its forks) is affected.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if not defaults or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            log.warning("this flwr version's %s has no initial_backoff/backoff_cap; keeping its back-off", fn.__name__)
            continue
        defaults["initial_backoff"], defaults["backoff_cap"] = float(initial_s), float(cap_s)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    limit = 0.1
    if "--poll-interval" in args:
        i = args.index("--poll-interval")
        try:
            limit = float(args[i + 1])
        except (IndexError, ValueError):
            print("fast_supernode: error: --poll-interval needs a number of seconds",
                  file=sys.stderr)
            raise SystemExit(2) from None
        del args[i:i + 2]
    try:
        patch_poll_interval(limit)
    except ValueError as err:
        print(f"fast_supernode: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.supernode.cli import flower_supernode

    patch_pull_backoff()  # the node downloads a message's objects as soon as the server has pushed them

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
