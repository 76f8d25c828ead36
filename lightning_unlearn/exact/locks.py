"""OS file locks on a SISA run's shards, so two processes never read-modify-write one shard state at once.

``fit`` holds the lock of the shard it trains (shards still train in parallel, one process each);
``forget`` and ``ensemble`` hold every shard's lock, so a deletion reads the states, retrains and
commits without another deletion or fit in between, and a reader never sees half of one. Locks are
``fcntl.flock`` on ``<run>/.locks/shard_007.lock``: the kernel releases them when a process dies,
so a killed run leaves no stale lock. Reentrant within a thread (a deletion evaluates the ensemble).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import IO, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class ShardLocks:
    """Exclusive, per-thread reentrant locks on the shards of the run in ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.folder = Path(root) / ".locks"
        self._local = threading.local()

    def _held(self) -> dict[int, list]:
        if not hasattr(self._local, "held"):
            self._local.held = {}
        return self._local.held

    @contextlib.contextmanager
    def hold(self, shards: Iterable[int]) -> Iterator[None]:
        """Hold the locks of ``shards`` (taken in increasing order, so two holders never deadlock)."""
        held = self._held()
        taken: list[int] = []
        try:
            for shard in sorted(set(int(s) for s in shards)):
                if shard in held:
                    held[shard][1] += 1
                else:
                    held[shard] = [self._acquire(shard), 1]
                taken.append(shard)
            yield
        finally:
            for shard in reversed(taken):
                held[shard][1] -= 1
                if held[shard][1] == 0:
                    handle = held.pop(shard)[0]
                    if handle is not None:
                        fcntl.flock(handle, fcntl.LOCK_UN)
                        handle.close()

    def _acquire(self, shard: int) -> IO | None:
        if fcntl is None:
            if not getattr(ShardLocks, "_warned", False):
                ShardLocks._warned = True
                log.warning("no OS file locks on this platform: never run two SISA commands on one run at once")
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / f"shard_{shard:03d}.lock", "a+b")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("SISA shard %d of %s is in use by another process: waiting for it", shard, self.folder.parent)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        return handle
