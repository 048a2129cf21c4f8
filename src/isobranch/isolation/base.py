"""The backend base class, and the helpers backends share to wait for their task source."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..branch import BranchTask, ParallelFlowResult
    from ..branch_retry import NotReady
    from ..cancellation import CancelSignal


class IsolationBackend:
    """Where the branches of a fan-out run: the base class of every backend.

    Every capability the rest of the engine asks a backend about is an
    attribute declared here with its default, so a subclass states only how
    it differs. A subclass implements ``stream_branches`` (see below) and,
    if it holds workers, ``close``. A backend written to the first protocol
    (an object with ``run_branches`` or ``stream_branches`` and ``close``,
    subclassing nothing) is wrapped by the registry in an adapter that
    declares the same capabilities (``adapters``).

    ``stream_branches(tasks, *, max_concurrency, cancel=None)`` pulls tasks
    from ``tasks`` only as it can start them (never more than
    ``max_concurrency`` started and unfinished; None: its worker count) and
    yields ``(position in tasks, result)`` in completion order, never
    raising for a failing branch. It applies no fail-fast rule (the runner
    does). When the consumer closes the generator early, queued branches
    are dropped and running ones stopped before ``close()`` of the
    generator returns; a set ``cancel`` (a ``CancelSignal``) does the same
    at once and raises ``RunCancelled``.
    """

    #: The name it is registered under (``ParallelFlowResult.isolation``).
    name: str = ""
    #: Branches run in other processes: the state must pickle, and the runner
    #: checks that before a fan-out, naming what does not.
    crosses_processes: bool = False
    #: Its task source may answer ``NotReady`` (a retry waiting); without it a
    #: fan-out with retries runs in rounds.
    accepts_not_ready: bool = False
    #: How many branches it runs at once (None: it does not say).
    max_workers: int | None = None

    def check_branch_max_memory(self, limit: int) -> str | None:
        """Why this backend cannot enforce a ``branch_max_memory`` of ``limit`` bytes
        (None: it can). By default it cannot: its branches share one process's memory."""
        return (f"isolation {self.name!r} cannot enforce a memory limit per branch (its "
                f"branches share one process's memory); it is enforced by isolation "
                f"'process' (each worker process) and 'dask' (each worker of the local "
                f"cluster isobranch starts)")

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks``, yielding ``(position, result)`` as each finishes (see the class)."""
        raise NotImplementedError(f"backend {self.name!r} does not implement stream_branches")

    def close(self) -> None:
        """Release every worker the backend owns (nothing by default). Safe twice."""


def set_waker(tasks: Any, callback: Callable[[], None]) -> None:
    """Tell ``tasks`` how to wake the backend waiting on it, if it wants to know."""
    hook = getattr(tasks, "set_waker", None)
    if callable(hook):
        hook(callback)


def wait_until_ready(marker: NotReady, woken: threading.Event) -> None:
    """For a backend with nothing running: wait until ``marker.wake_at`` or ``woken``."""
    if marker.wake_at is None:
        raise RuntimeError("the task source waits for a result, but no branch is running")
    woken.wait(max(marker.wake_at - time.monotonic(), 0.0))
    woken.clear()


class PipeWaker:
    """A pipe whose read end ``fd`` joins the file descriptors a backend waits on, so
    another thread (a fan-out being stopped) can end that wait at once."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self._write, False)
        os.set_blocking(self.fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        """End the wait (from any thread); nothing after ``close``."""
        with self._lock, contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            if not self._closed:
                os.write(self._write, b"!")

    def clear(self) -> None:
        """Forget the wake-ups so far."""
        with contextlib.suppress(OSError):
            os.read(self.fd, 4096)

    def close(self) -> None:
        """Close both ends (a later ``wake`` writes nowhere)."""
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self._write)
