"""Process helpers shared by long-running parts (the ledger's job recovery, Flower's warm executor)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
