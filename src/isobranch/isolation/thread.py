"""The thread backend: branches run on a reusable pool of daemon threads.

Lupa releases the GIL while Lua runs, so Lua-heavy branches scale with
cores. The pool is created on first use and reused until ``close()``; each
branch still gets a fresh context, so a reused thread never carries a VM over.

A fan-out runs in "lanes": pool calls that each take branch after branch
from the fan-out driver's source and run them in a row, reporting results
through one queue. So a branch costs no future, pool hand-off or
done-callback of its own, and no round trip through the driver between
branches; the driver's policies (how many run at once, deadlines, retries)
still decide what a lane may take and when one is given up.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from typing import TYPE_CHECKING

from ..branch import BranchMonitor, BranchRun, ParallelFlowResult, timed_out_result
from ..errors import BackendError, ConfigError
from .base import BackendFanOut, Finished, IsolationBackend, RunSource
from .thread_pool import DaemonThreadPool

if TYPE_CHECKING:
    from ..branch import BranchGraph

# A branch gets this long past its deadline to report its own timeout (with
# its state and node) before the backend stops waiting for it.
TIMEOUT_GRACE_SECONDS = 0.25
logger = logging.getLogger(__name__)

# Branches lanes may run ahead of the driver, per thread (finished, their
# results not yet handed on): enough that lanes rarely run dry while the
# driver waits for the GIL.
SUBMIT_AHEAD_PER_THREAD = 8
# Branches a lane runs in a row before it lets other pool work go first.
LANE_BATCH = 64
# After a cancellation, how long the fan-out waits for its stopped branches to
# return (Lua stops within milliseconds; a Python node at its next boundary).
CANCEL_WAIT_SECONDS = 0.5


class ThreadBackend(IsolationBackend):
    """Runs branches concurrently on a pool of threads owned by this backend.

    ``branch_timeout`` is cooperative: Lua is interrupted by its hook, Python
    nodes at the next node boundary; a Python node stuck in one call is
    abandoned (reported as timed out) but its thread runs on until it returns.
    """

    name = "thread"
    # Branches run in this process: the state need not pickle.
    crosses_processes = False
    tasks_ahead_per_worker = SUBMIT_AHEAD_PER_THREAD
    # A branch stuck in one call past its deadline is given up on (its thread runs on).
    kills_overdue = True
    kill_grace_seconds = TIMEOUT_GRACE_SECONDS

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: DaemonThreadPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Branches given up on (timeout, fail_fast) that may still be running.
        self._abandoned: list[Future] = []

    def pool(self) -> DaemonThreadPool:
        """The pool, started on first use; ``BackendError`` once the backend is closed."""
        with self._lock:
            if self._closed:
                raise BackendError("thread backend is closed")
            if self._executor is None:
                # Daemon threads: a call abandoned at branch_timeout must not
                # keep the interpreter from exiting.
                self._executor = DaemonThreadPool(self.max_workers,
                                                  thread_name_prefix="isobranch-branch")
            return self._executor

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """Lanes on this backend's pool for one fan-out."""
        return _Lanes(self, source, graph)

    def abandon(self, futures: Iterable[Future]) -> None:
        """Lane calls given up on (a timeout, a fan-out stopped early): ``close`` does not
        wait for one still running."""
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
        if stuck:
            # Given up on at a timeout (logged then as a warning) or stopped early and not
            # back yet (fail_fast, Ctrl-C): not news, so only a debug record.
            logger.debug("thread backend: closing without waiting for threads still in "
                         "branches it stopped or gave up on (daemon threads: each ends "
                         "with its call)")
        if executor is not None:
            executor.shutdown(wait=not stuck, cancel_futures=True)


# What a lane reports: a run and its result, or a run and what run_branch raised;
# ``(None, None, error)`` when a lane itself failed, ``(None, None, None)`` to wake
# the driver.
_Report = tuple["BranchRun | None", "ParallelFlowResult | None", "BaseException | None"]
# What a lane takes: the run and the graph's ``run_branch`` to run it with.
_Taken = tuple[BranchRun, Callable[..., ParallelFlowResult]]


class _Lanes(BackendFanOut):
    """One fan-out on the thread backend: the lanes that run its branches.

    At most ``width`` lanes are live (``max_concurrency`` or the pool's
    size, whichever is smaller), so at most that many branches run at once;
    how many a lane may take at all is the driver's source's to say. A lane
    leaves when the source has nothing for it, and after ``LANE_BATCH``
    branches goes to the back of the pool's queue, so other fan-outs sharing
    the pool get their turn. Lanes are started and retired under one lock,
    together with a lane's take, so a lane never leaves while the driver
    thinks it will take the room just freed.
    """

    # Lanes take runs in the pool's threads.
    takes_from_other_threads = True

    def __init__(self, backend: ThreadBackend, source: RunSource,
                 graph: BranchGraph) -> None:
        self._backend = backend
        self._source: RunSource | None = source
        self.graph: BranchGraph | None = graph
        self.slots = backend.max_workers
        self._width: int | None = None
        self._lock = threading.Lock()
        self._live = 0
        # Runs taken by ``start`` for the lanes it started, first come first served.
        self._queued: deque[BranchRun] = deque()
        self._lanes: set[_Lane] = set()
        self._stopped = False
        self._futures: list[Future] = []
        self.finished: queue.SimpleQueue[_Report] = queue.SimpleQueue()

    def start(self) -> None:
        """Start lanes, up to the width, as many as there are runs to take now: those runs
        are taken here and queued, and whichever lane starts first takes the first."""
        with self._lock:
            if self._stopped:
                return
            if self._width is None:
                self._width = min(self._source.max_concurrency or self.slots, self.slots)
            while self._live < self._width and not self._stopped:
                if len(self._queued) <= self._live:
                    run = self._source.take()
                    if run is None:
                        break
                    self._queued.append(run)
                lane = _Lane(self)
                self._submit(lane)
                self._lanes.add(lane)
                self._live += 1

    def _submit(self, lane: _Lane) -> None:
        # Called with the lock held. The done callback only puts to a queue:
        # the pool runs it (on cancel) under the pool's own lock.
        lane.future = self._backend.pool().submit(lane.run)
        if len(self._futures) > 4 * (self._width or 1):
            self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(lane.future)
        lane.future.add_done_callback(self._lane_ended)

    def _lane_ended(self, future: Future) -> None:
        if future.cancelled():
            self.finished.put((None, None, RuntimeError(
                "thread backend: its pool was shut down while branches were waiting")))

    def _retire(self, lane: _Lane) -> None:
        # Called with the lock held.
        lane.retired = True
        self._live -= 1
        self._lanes.discard(lane)

    def take(self, lane: _Lane) -> _Taken | None:
        """The next run for ``lane`` and what runs it, or None when the lane must leave.

        The graph is handed out with each run, under the lock ``close`` drops it
        under, so a lane holds the graph only while it runs one of its branches.
        """
        with self._lock:
            if lane.retired:
                return None
            run = None
            if not self._stopped:
                run = self._queued.popleft() if self._queued else self._source.take()
            if run is None:
                self._retire(lane)
                return None
            run.handle = (lane, BranchMonitor())
            lane.current = run
            return run, self.graph.run_branch

    def requeue(self, lane: _Lane) -> None:
        """``lane`` ran its batch: send it to the back of the pool's queue, or let it leave."""
        with self._lock:
            if lane.retired:
                return
            if self._stopped or not (self._queued or self._source.ready()):
                self._retire(lane)
                return
            try:
                self._submit(lane)
            except BaseException as exc:  # the backend was closed meanwhile
                self._retire(lane)
                self.finished.put((None, None, exc))

    def collect(self, timeout: float | None) -> list[Finished]:
        """What lanes reported (raising what a lane raised); waits up to ``timeout``."""
        try:
            reports = [self.finished.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                reports.append(self.finished.get_nowait())
            except queue.Empty:
                break
        done: list[Finished] = []
        for run, result, error in reports:
            if run is None:
                if error is not None:
                    raise error
                continue  # a wake-up
            if error is not None:
                if run.done:
                    continue  # given up on meanwhile
                raise error
            assert result is not None
            done.append((run, result))
        return done

    def wake(self) -> None:
        """Wake ``collect`` (from any thread)."""
        self.finished.put((None, None, None))

    def kill(self, run: BranchRun) -> ParallelFlowResult:
        """Give up on ``run``, stuck in one call: its lane takes no more branches (another
        takes its place) and its thread runs on until the call returns."""
        lane, monitor = run.handle
        monitor.cancelled.cancel()
        logger.warning("thread backend: branch %r is past its %gs branch_timeout in node %r "
                       "and did not stop; its thread is abandoned and runs on until the call "
                       "returns", run.task.name, run.task.limits.branch_timeout, monitor.node)
        with self._lock:
            stuck = []
            if not lane.retired:
                self._retire(lane)
                if lane.future is not None:
                    stuck.append(lane.future)
        self._backend.abandon(stuck)
        return timed_out_result(run.task, monitor)

    def close(self, *, cancelled: bool) -> None:
        """Take no more runs; stop the branches still running (at their next node boundary
        or Lua hook) without waiting for one stuck in a call, except briefly after a
        cancellation."""
        with self._lock:
            self._stopped = True
            self._queued.clear()
            # A pool thread still holds its lane (and so this fan-out) for a moment
            # after the last report: it must not hold the graph and its source too,
            # or a graph dropped unclosed right after its run escapes collection
            # (and so keeps its pool threads) whenever gc runs in that moment.
            self.graph = None
            self._source = None
            stopped = [lane.current for lane in self._lanes
                       if lane.current is not None and not lane.current.done]
            futures = [f for f in self._futures if not f.done()]
        for run in stopped:
            run.handle[1].cancelled.cancel()
        if stopped:
            self._backend.abandon(futures)
            if cancelled:
                wait_for_futures(futures, timeout=CANCEL_WAIT_SECONDS)


class _Lane:
    """One pool call running branches of a fan-out in a row."""

    __slots__ = ("_lanes", "current", "future", "retired")

    def __init__(self, lanes: _Lanes) -> None:
        self._lanes = lanes
        self.future: Future | None = None
        self.retired = False
        self.current: BranchRun | None = None

    def run(self) -> None:
        lanes = self._lanes
        report = lanes.finished.put
        for _ in range(LANE_BATCH):
            taken = lanes.take(self)
            if taken is None:
                return
            run, run_branch = taken
            run.started_at = time.monotonic()
            try:
                result = run_branch(run.task, run.handle[1])
            except BaseException as exc:  # reported to the driver, which raises it
                report((run, None, exc))
            else:
                report((run, result, None))
            self.current = None
            del run, run_branch, taken
        lanes.requeue(self)
