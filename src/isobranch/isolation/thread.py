"""The thread backend: branches run on a reusable pool of daemon threads.

Lupa releases the GIL while Lua runs, so Lua-heavy branches scale with
cores. The pool is created on first use and reused until ``close()``; each
branch still gets a fresh context, so a reused thread never carries a VM over.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from ..branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    run_branch,
    timed_out_result,
)
from .base import register_backend, run_in_order
from .thread_pool import DaemonThreadPool

# A branch gets this long past its deadline to report its own timeout (with
# its state and node) before the backend stops waiting for it.
TIMEOUT_GRACE_SECONDS = 0.25
# Branches submitted beyond the pool's threads, per thread (they wait in its queue).
SUBMIT_AHEAD_PER_THREAD = 2


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

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` concurrently, yielding ``(position, result)`` as each finishes.

        At most ``max_concurrency`` (default: the pool size) branches run at
        once. Tasks are taken from ``tasks`` only as branches finish: up to
        ``max_concurrency`` submitted and unfinished, plus, when the pool's
        own size is the bound, ``SUBMIT_AHEAD_PER_THREAD`` per thread waiting
        in its queue. Closing the generator cancels the queued ones and tells
        the running ones to stop (abandoning one stuck in a call).
        """
        limit = max_concurrency or self.max_workers
        # When the pool itself is the bound, a few more wait in its queue, so a
        # thread that finishes starts the next branch without waiting for this one.
        queued_ahead = SUBMIT_AHEAD_PER_THREAD * self.max_workers if limit >= self.max_workers \
            else 0
        source = iter(tasks)
        pending: dict[Future, _Submitted] = {}
        # Futures as they finish (their done callbacks put them here).
        finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        position = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < limit + queued_ahead:
                    task = next(source, None)
                    if task is None:
                        exhausted = True
                        break
                    submitted = _Submitted(position, task, BranchMonitor())
                    future = self._pool().submit(run_branch, task, submitted.monitor)
                    pending[future] = submitted
                    future.add_done_callback(finished.put)
                    position += 1
                if not pending:
                    return
                for future in _next_finished(finished, _next_wakeup(pending.values())):
                    submitted = pending.pop(future, None)
                    if submitted is not None:  # not one given up on meanwhile
                        yield submitted.position, future.result()
                for future, submitted in _overdue(pending):
                    del pending[future]
                    submitted.monitor.cancelled.set()
                    self._abandon([future])
                    yield submitted.position, timed_out_result(submitted.task, submitted.monitor)
        finally:
            # Stopped early (fail_fast, Ctrl-C, a consumer gone): branches stop at
            # their next node boundary or Lua hook, queued ones never start, and
            # close() does not wait for one stuck in a single Python call.
            for future, submitted in pending.items():
                submitted.monitor.cancelled.set()
                future.cancel()
            self._abandon(pending)

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` concurrently and return their results in task order."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def _abandon(self, futures: Iterable[Future]) -> None:
        with self._lock:
            self._abandoned = [f for f in self._abandoned if not f.done()]
            self._abandoned.extend(f for f in futures if not f.done())

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


@dataclass
class _Submitted:
    """A branch handed to the pool: where it stands in the fan-out, and its monitor."""

    position: int
    task: BranchTask
    monitor: BranchMonitor


def _next_finished(finished: queue.SimpleQueue[Future], timeout: float | None) -> list[Future]:
    """Futures that finished: at least one unless ``timeout`` passes first."""
    try:
        done = [finished.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _next_wakeup(pending: Iterable[_Submitted]) -> float | None:
    deadlines = []
    waiting_to_start = False
    for submitted in pending:
        limit, started = submitted.task.limits.branch_timeout, submitted.monitor.started_at
        if not limit:
            continue
        if started is None:
            waiting_to_start = True
        else:
            deadlines.append(started + limit + TIMEOUT_GRACE_SECONDS)
    if not deadlines:
        # A queued branch with a timeout starts later; look again soon.
        return 0.05 if waiting_to_start else None
    wakeup = max(min(deadlines) - time.monotonic(), 0.0)
    return min(wakeup, 0.05) if waiting_to_start else wakeup


def _overdue(pending: dict[Future, _Submitted]) -> list[tuple[Future, _Submitted]]:
    now = time.monotonic()
    return [(future, submitted) for future, submitted in pending.items()
            if (limit := submitted.task.limits.branch_timeout)
            and submitted.monitor.started_at is not None
            and now >= submitted.monitor.started_at + limit + TIMEOUT_GRACE_SECONDS]


register_backend("thread", ThreadBackend)
