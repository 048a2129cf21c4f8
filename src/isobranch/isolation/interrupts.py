"""Ctrl-C is for the caller: worker processes start with SIGINT blocked.

A terminal sends SIGINT to its whole foreground process group, so worker
processes (the process backend's fork server and workers, Dask's local
workers) receive Ctrl-C along with the caller. Each would die with its own
``KeyboardInterrupt`` traceback, possibly half-way through starting, while
the caller, which decides what an interrupt means, is still cleaning up.

The signal mask is inherited by threads a thread creates and by processes it
starts, and survives ``exec``; so a child started (directly, or by a thread
created) inside ``sigint_blocked()`` never sees SIGINT before it has set up
its own handling. A Ctrl-C arriving meanwhile stays pending in the caller
and is delivered as soon as the block ends.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in the calling thread for the duration; restore the previous mask."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
