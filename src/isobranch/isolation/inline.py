"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..branch import BranchMonitor, BranchRun
from .base import BackendFanOut, Finished, IsolationBackend, RunSource

if TYPE_CHECKING:
    from ..branch import BranchGraph


class InlineBackend(IsolationBackend):
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from the graph's ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"
    # Branches run in this process: the state need not pickle.
    crosses_processes = False

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """One branch at a time, each taken when the previous one finished."""
        return _InlineFanOut(source, graph)


class _InlineFanOut(BackendFanOut):
    """``start`` takes the next branch, ``collect`` runs it, in the driver's own thread."""

    slots = 1

    def __init__(self, source: RunSource, graph: BranchGraph) -> None:
        self._source = source
        self._graph = graph
        self._next: BranchRun | None = None
        self._woken = _LazyEvent()
        # The branch running now: a cancellation stops it as a fail_fast sibling
        # would (at its next node boundary, or in Lua at once).
        self._running: BranchMonitor | None = None

    def start(self) -> None:
        """Take the next branch, when the previous one has finished."""
        if self._next is None:
            self._next = self._source.take()

    def collect(self, timeout: float | None) -> list[Finished]:
        """Run the branch taken to its end; with none (a retry waits), wait up to
        ``timeout`` or a ``wake``."""
        run, self._next = self._next, None
        if run is None:
            self._woken.wait(timeout)
            self._woken.clear()
            return []
        monitor = self._running = BranchMonitor()
        result = self._graph.run_branch(run.task, monitor)
        # Left set if run_branch raised (Ctrl-C): the fan-out ends with it anyway.
        self._running = None
        return [(run, result)]

    def wake(self) -> None:
        """End a wait for a retry."""
        self._woken.set()

    def interrupt(self) -> None:
        """Stop the branch running now, and any wait."""
        running = self._running
        if running is not None:
            running.cancelled.cancel()
        self._woken.set()


class _LazyEvent:
    """A ``threading.Event`` made only when somebody waits: most inline fan-outs never
    wait (only while a retry's backoff runs), and an event costs more than a branch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event: threading.Event | None = None
        self._set = False

    def set(self) -> None:
        with self._lock:
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None) -> None:
        with self._lock:
            if self._set:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        event.wait(timeout)

    def clear(self) -> None:
        with self._lock:
            self._set = False
            if self._event is not None:
                self._event.clear()
