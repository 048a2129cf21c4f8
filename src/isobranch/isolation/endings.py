"""How the end of a worker process is described in a branch's error.

Used by the launcher that sees a worker end (process/launcher.py) and by the memory
limit, which tells the OOM killer's SIGKILL from others by that description.
"""

from __future__ import annotations

import signal


def describe_signal(number: int) -> str:
    """How a worker killed by signal ``number`` is reported."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown signal"
    if number == signal.SIGKILL:
        return (f"was killed by signal {number} ({name}: sent from outside the worker, "
                f"e.g. by the kernel's out-of-memory killer)")
    return f"was killed by signal {number} ({name})"
