"""The thread backend: branches run on a reusable pool of daemon threads.

Lupa releases the GIL while Lua runs, so Lua-heavy branches scale with
cores. The pool is created on first use and reused until ``close()``; each
branch still gets a fresh context, so a reused thread never carries a VM over.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait

from ..branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    cancelled_result,
    run_branch,
    timed_out_result,
)
from .base import register_backend
from .thread_pool import DaemonThreadPool

# A branch gets this long past its deadline to report its own timeout (with
# its state and node) before the backend stops waiting for it.
TIMEOUT_GRACE_SECONDS = 0.25


class ThreadBackend:
    """Runs branches concurrently on a pool of threads owned by this backend.

    ``branch_timeout`` is cooperative: Lua is interrupted by its hook, Python
    nodes at the next node boundary; a Python node stuck in one call is
    abandoned (reported as timed out) but its thread runs on until it returns.
    """

    name = "thread"

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: DaemonThreadPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Branches given up on (timeout, fail_fast) that may still be running.
        self._abandoned: list[Future] = []

    def _pool(self) -> DaemonThreadPool:
        with self._lock:
            if self._closed:
                raise RuntimeError("thread backend is closed")
            if self._executor is None:
                # Daemon threads: a call abandoned at branch_timeout must not
                # keep the interpreter from exiting.
                self._executor = DaemonThreadPool(self.max_workers,
                                                  thread_name_prefix="isobranch-branch")
            return self._executor

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` concurrently and return their results in task order."""
        pool = self._pool()
        monitors = [BranchMonitor() for _ in tasks]
        pending: dict[Future, int] = {}
        results: list[ParallelFlowResult | None] = [None] * len(tasks)
        try:
            for index, (task, monitor) in enumerate(zip(tasks, monitors, strict=True)):
                pending[pool.submit(run_branch, task, monitor)] = index
            while pending:
                done, _ = wait(pending, timeout=self._next_wakeup(tasks, monitors, pending),
                               return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    results[index] = future.result()
                first_failure = next((r for r in results if r is not None and not r.success),
                                     None)
                if first_failure is not None and tasks[0].limits.fail_fast:
                    self._abandon(pending)
                    self._cancel(pending, tasks, monitors, results, first_failure)
                    break
                overdue = self._expire_overdue(pending, tasks, monitors, results)
                self._abandon(overdue)
        except BaseException:
            # Interrupted (Ctrl-C, a test timeout): branches stop at their next
            # node boundary or Lua hook, and close() does not wait for one stuck
            # in a single Python call.
            for future, index in pending.items():
                monitors[index].cancelled.set()
                future.cancel()
            self._abandon(pending)
            raise
        return [r for r in results if r is not None]

    def _abandon(self, futures: Iterable[Future]) -> None:
        with self._lock:
            self._abandoned = [f for f in self._abandoned if not f.done()]
            self._abandoned.extend(f for f in futures if not f.done())

    @staticmethod
    def _next_wakeup(tasks: list[BranchTask], monitors: list[BranchMonitor],
                     pending: dict[Future, int]) -> float | None:
        deadlines = [
            monitors[i].started_at + tasks[i].limits.branch_timeout + TIMEOUT_GRACE_SECONDS
            for i in pending.values()
            if tasks[i].limits.branch_timeout and monitors[i].started_at is not None
        ]
        waiting_to_start = any(tasks[i].limits.branch_timeout and monitors[i].started_at is None
                               for i in pending.values())
        if not deadlines:
            # A queued branch with a timeout starts later; look again soon.
            return 0.05 if waiting_to_start else None
        wakeup = max(min(deadlines) - time.monotonic(), 0.0)
        return min(wakeup, 0.05) if waiting_to_start else wakeup

    @staticmethod
    def _expire_overdue(pending: dict[Future, int], tasks: list[BranchTask],
                        monitors: list[BranchMonitor],
                        results: list[ParallelFlowResult | None]) -> list[Future]:
        now = time.monotonic()
        overdue = []
        for future, index in list(pending.items()):
            limit, started = tasks[index].limits.branch_timeout, monitors[index].started_at
            if limit and started is not None and now >= started + limit + TIMEOUT_GRACE_SECONDS:
                monitors[index].cancelled.set()
                results[index] = timed_out_result(tasks[index], monitors[index])
                del pending[future]
                overdue.append(future)
        return overdue

    @staticmethod
    def _cancel(pending: dict[Future, int], tasks: list[BranchTask],
                monitors: list[BranchMonitor], results: list[ParallelFlowResult | None],
                failure: ParallelFlowResult) -> None:
        reason = f"cancelled: branch {failure.branch!r} failed first (fail_fast)"
        for future, index in pending.items():
            monitors[index].cancelled.set()
            future.cancel()
            results[index] = cancelled_result(tasks[index], reason)
        pending.clear()

    def close(self) -> None:
        """Shut the pool down and wait for its threads.

        A Python node that never returns cannot be stopped from outside its
        thread; if a branch was abandoned that way, ``close`` does not wait
        for it (the thread, a daemon, ends when the node returns or the process exits).
        """
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            stuck = any(not f.done() for f in self._abandoned)
        if executor is not None:
            executor.shutdown(wait=not stuck, cancel_futures=True)


register_backend("thread", ThreadBackend)
