"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..branch import BranchMonitor
from ..branch_run import run_branch
from .base import BackendFanOut, Finished, IsolationBackend, RunSource

if TYPE_CHECKING:
    from ..compiled import CompiledGraph


class InlineBackend(IsolationBackend):
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"
    # Branches run in this process: the state need not pickle.
    crosses_processes = False

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def open(self, source: RunSource, graph: CompiledGraph) -> BackendFanOut:
        """One branch at a time, each taken when the previous one finished."""
        return _InlineFanOut(source)


class _InlineFanOut(BackendFanOut):
    """``collect`` runs the next branch, in the driver's own thread."""

    slots = 1

    def __init__(self, source: RunSource) -> None:
        self._source = source
        self._woken = threading.Event()
        # The branch running now: a cancellation stops it as a fail_fast sibling
        # would (at its next node boundary, or in Lua at once).
        self._running: BranchMonitor | None = None

    def start(self) -> None:
        """Nothing starts ahead: ``collect`` runs each branch."""

    def collect(self, timeout: float | None) -> list[Finished]:
        """Run the next branch to its end; with none ready (a retry waits), wait up to
        ``timeout`` or a ``wake``."""
        run = self._source.take()
        if run is None:
            self._woken.wait(timeout)
            self._woken.clear()
            return []
        monitor = self._running = BranchMonitor()
        try:
            return [(run, run_branch(run.task, monitor))]
        finally:
            self._running = None

    def wake(self) -> None:
        """End a wait for a retry."""
        self._woken.set()

    def interrupt(self) -> None:
        """Stop the branch running now, and any wait."""
        running = self._running
        if running is not None:
            running.cancelled.cancel()
        self._woken.set()
