"""The thread backend: branches run on a reusable pool of daemon threads.

Lupa releases the GIL while Lua runs, so Lua-heavy branches scale with
cores. The pool is created on first use and reused until ``close()``; each
branch still gets a fresh context, so a reused thread never carries a VM over.

The lanes that pace a streamed fan-out stay here with the backend (a little
over 400 lines): they and its early-stop path share one queue of reports.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass

from ..branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    timed_out_result,
)
from ..branch_run import run_branch
from ..cancellation import CancelSignal
from ..errors import BackendError, ConfigError
from ..fanout import run_in_order
from .base import NotReady, register_backend, set_waker
from .thread_pool import DaemonThreadPool

# A branch gets this long past its deadline to report its own timeout (with
# its state and node) before the backend stops waiting for it.
TIMEOUT_GRACE_SECONDS = 0.25
logger = logging.getLogger(__name__)

# Branches taken beyond the pool's threads, per thread (built and waiting for a lane):
# enough that lanes rarely run dry while the consumer waits for the GIL.
SUBMIT_AHEAD_PER_THREAD = 8
# Branches a lane runs in a row before it lets other pool work go first.
LANE_BATCH = 64
# After a cancellation, how long the stream waits for its stopped branches to
# return (Lua stops within milliseconds; a Python node at its next boundary).
CANCEL_WAIT_SECONDS = 0.5


class ThreadBackend:
    """Runs branches concurrently on a pool of threads owned by this backend.

    ``branch_timeout`` is cooperative: Lua is interrupted by its hook, Python
    nodes at the next node boundary; a Python node stuck in one call is
    abandoned (reported as timed out) but its thread runs on until it returns.
    """

    name = "thread"
    cancellable = True
    # Its tasks may answer NotReady (a retry waiting); running branches go on.
    accepts_not_ready = True
    # Branches run in this process: the state need not pickle.
    crosses_processes = False

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: DaemonThreadPool | None = None
        self._lock = threading.Lock()
        self._closed = False
        # Branches given up on (timeout, fail_fast) that may still be running.
        self._abandoned: list[Future] = []

    def _pool(self) -> DaemonThreadPool:
        with self._lock:
            if self._closed:
                raise BackendError("thread backend is closed")
            if self._executor is None:
                # Daemon threads: a call abandoned at branch_timeout must not
                # keep the interpreter from exiting.
                self._executor = DaemonThreadPool(self.max_workers,
                                                  thread_name_prefix="isobranch-branch")
            return self._executor

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` concurrently, yielding ``(position, result)`` as each finishes.

        At most ``max_concurrency`` (default: the pool size) branches run at
        once. Tasks are taken from ``tasks`` only as branches finish: up to
        ``max_concurrency`` submitted and unfinished, plus, when the pool's
        own size is the bound, ``SUBMIT_AHEAD_PER_THREAD`` per thread waiting
        in a queue. Closing the generator drops the queued ones and tells the
        running ones to stop (abandoning one stuck in a call). A set
        ``cancel`` wakes the wait and does the same, waiting up to
        ``CANCEL_WAIT_SECONDS`` for the stopped branches, then raises
        ``RunCancelled``.
        """
        limit = max_concurrency or self.max_workers
        # When the pool itself is the bound, a few more wait in the queue, so a
        # thread that finishes starts the next branch without waiting for this one.
        queued_ahead = SUBMIT_AHEAD_PER_THREAD * self.max_workers if limit >= self.max_workers \
            else 0
        source = iter(tasks)
        lanes = _Lanes(self._pool, source, width=min(limit, self.max_workers),
                       cap=limit + queued_ahead)
        set_waker(source, lanes.wake)
        forget = None
        if cancel is not None:
            forget = cancel.add_callback(lambda: lanes.finished.put((None, None, cancel.error())))
        try:
            lanes.fill()
            while not lanes.all_done():
                reports = _next_finished(lanes.finished, _sooner(
                    _next_wakeup(lanes.outstanding()), lanes.source_wakeup()))
                for report in reports:
                    # Handed back one at a time: a branch counts as consumed only
                    # when it is yielded, so lanes running on while the consumer
                    # holds a result take no more than ``cap`` ahead of it.
                    handed = lanes.consume(report)
                    if handed is not None:
                        yield handed
                for submitted in _overdue(lanes.outstanding()):
                    submitted.monitor.cancelled.cancel()
                    logger.warning("thread backend: branch %r is past its %gs branch_timeout "
                                   "in node %r and did not stop; its thread is abandoned and "
                                   "runs on until the call returns", submitted.task.label,
                                   submitted.task.limits.branch_timeout, submitted.monitor.node)
                    self._abandon(lanes.give_up(submitted))
                    yield submitted.position, timed_out_result(submitted.task, submitted.monitor)
                lanes.ask_again()
            if lanes.source_error is not None:
                # The tasks ran out by failing in a lane: the last branch may be
                # handed back before the consumer reads that report.
                raise lanes.source_error
        finally:
            # Stopped early (fail_fast, Ctrl-C, a consumer gone): branches stop at
            # their next node boundary or Lua hook, queued ones never start, and
            # close() does not wait for one stuck in a single Python call.
            stopped_early = lanes.stop()
            for submitted in stopped_early:
                submitted.monitor.cancelled.cancel()
            if stopped_early:
                self._abandon(lanes.futures())
            if forget is not None:
                forget()
                if cancel is not None and cancel.is_set():
                    wait_for_futures(lanes.futures(), timeout=CANCEL_WAIT_SECONDS)

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
        if stuck:
            # Given up on at a timeout (logged then as a warning) or stopped early and not
            # back yet (fail_fast, Ctrl-C): not news, so only a debug record.
            logger.debug("thread backend: closing without waiting for threads still in "
                         "branches it stopped or gave up on (daemon threads: each ends "
                         "with its call)")
        if executor is not None:
            executor.shutdown(wait=not stuck, cancel_futures=True)


@dataclass(slots=True)
class _Submitted:
    """A branch taken from the tasks: where it stands in the fan-out, its monitor, its lane."""

    position: int
    task: BranchTask
    monitor: BranchMonitor
    lane: _Lane | None = None


# What a lane reports: the branch and its result, or the exception run_branch
# raised; ``(None, None, error)`` when a lane itself failed, ``(None, None,
# None)`` to wake the consumer when the tasks ran out.
_Finished = tuple["_Submitted | None", "ParallelFlowResult | None", "BaseException | None"]


class _Lanes:
    """The branches of one ``stream_branches`` call and the lanes that run them.

    A lane is one pool call that runs branches one after another, taking
    each from the queue or, when that is empty, building it from the tasks
    itself; so a branch costs no future, pool hand-off or done-callback of
    its own, and no round trip through the consumer between branches. At
    most ``width`` lanes are live, so at most ``width`` branches run at once;
    at most ``cap`` branches are taken and not yet consumed. A lane leaves
    when there is nothing to take, and after ``LANE_BATCH`` branches goes to
    the back of the pool's queue, so other fan-outs sharing the pool get
    their turn. Everything shared is guarded by one lock.
    """

    def __init__(self, pool: Callable[[], DaemonThreadPool], source: Iterator[BranchTask], *,
                 width: int, cap: int) -> None:
        self._pool = pool
        self._source = source
        self._width = width
        self._cap = cap
        self._lock = threading.Lock()
        self._queued: deque[_Submitted] = deque()
        self._outstanding: dict[int, _Submitted] = {}
        self._position = 0
        self._exhausted = False
        # The source answered NotReady: not asked again before this time
        # (inf: not before a result was handed back), 0.0 when it did not.
        self._not_before = 0.0
        self._live = 0
        self._stopped = False
        self._futures: list[Future] = []
        # What a lane's call for the next task raised (also reported on ``finished``).
        self.source_error: BaseException | None = None
        self.finished: queue.SimpleQueue[_Finished] = queue.SimpleQueue()

    def fill(self) -> None:
        """Take the first ``cap`` tasks (in the caller's thread) and start lanes for them."""
        with self._lock:
            while len(self._outstanding) < self._cap:
                submitted = self._take_task()
                if submitted is None:
                    break
                self._queued.append(submitted)
            self._start_lanes()

    def _take_task(self) -> _Submitted | None:
        # Called with the lock held: the tasks are an iterator no two threads may advance.
        if self._exhausted or not self._source_ready():
            return None
        try:
            task = next(self._source, None)
        except BaseException:
            self._exhausted = True
            raise
        if task is None:
            self._exhausted = True
            return None
        if isinstance(task, NotReady):
            self._not_before = math.inf if task.wake_at is None else task.wake_at
            return None
        self._not_before = 0.0
        submitted = _Submitted(self._position, task, BranchMonitor())
        self._outstanding[self._position] = submitted
        self._position += 1
        return submitted

    def _source_ready(self) -> bool:
        return not self._not_before or time.monotonic() >= self._not_before

    def _has_work(self) -> bool:
        return not self._stopped and bool(self._queued or (
            not self._exhausted and len(self._outstanding) < self._cap and self._source_ready()))

    def source_wakeup(self) -> float | None:
        """Seconds until the source said a task would be ready (None: no such time)."""
        with self._lock:
            if not self._not_before or self._not_before == math.inf:
                return None
            return max(self._not_before - time.monotonic(), 0.0)

    def ask_again(self) -> None:
        """In the consumer, after a result was handed back or a wait ended: if the source
        said it had nothing ready, ask it again (a retry may be due or newly scheduled)."""
        if not self._not_before:  # the common case, read without the lock
            return
        with self._lock:
            self._not_before = 0.0
        self.fill()

    def wake(self) -> None:
        """Wake the consumer (from any thread): the source has changed."""
        self.finished.put((None, None, None))

    def _start_lanes(self) -> None:
        # Called with the lock held.
        while self._live < self._width and self._has_work() \
                and (self._live < len(self._queued) or not self._queued):
            self._submit(_Lane(self))
            self._live += 1

    def _submit(self, lane: _Lane) -> None:
        # Called with the lock held. The done callback only puts to a queue:
        # the pool runs it (on cancel) under the pool's own lock.
        lane.future = self._pool().submit(lane.run)
        if len(self._futures) > 4 * self._width:
            self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(lane.future)
        lane.future.add_done_callback(self._lane_ended)

    def _lane_ended(self, future: Future) -> None:
        if future.cancelled():
            self.finished.put((None, None, RuntimeError(
                "thread backend: its pool was shut down while branches were waiting")))

    def take(self, lane: _Lane) -> _Submitted | None:
        """The next branch for ``lane``, or None when the lane must leave."""
        with self._lock:
            if lane.retired:
                return None
            submitted = None
            if not self._stopped:
                if self._queued:
                    submitted = self._queued.popleft()
                elif len(self._outstanding) < self._cap:
                    try:
                        submitted = self._take_task()
                    except BaseException as exc:  # building a task failed: the consumer raises it
                        self.source_error = exc
                        self.finished.put((None, None, exc))
                    if submitted is None and self._exhausted:
                        self.finished.put((None, None, None))  # wake the consumer to finish
            if submitted is None:
                self._live -= 1
                lane.retired = True
                return None
            submitted.lane = lane
            return submitted

    def requeue(self, lane: _Lane) -> None:
        """``lane`` ran its batch: send it to the back of the pool's queue, or let it leave."""
        with self._lock:
            if lane.retired:
                return
            if not self._has_work():
                self._live -= 1
                lane.retired = True
                return
            try:
                self._submit(lane)
            except BaseException as exc:  # the backend was closed meanwhile
                self._live -= 1
                lane.retired = True
                self.finished.put((None, None, exc))

    def consume(self, report: _Finished) -> tuple[int, ParallelFlowResult] | None:
        """The position and result of one report if still wanted (raising what a lane
        raised), None for a wake-up or a branch given up on; lanes restart for the room
        it leaves."""
        submitted, result, error = report
        with self._lock:
            if submitted is None:
                if error is not None:
                    raise error
                return None  # a wake-up: the tasks ran out or the source changed
            if self._outstanding.pop(submitted.position, None) is None:
                return None  # given up on meanwhile
            if error is not None:
                raise error
            assert result is not None
            self._start_lanes()
        return submitted.position, result

    def outstanding(self) -> list[_Submitted]:
        """Branches taken and not yet consumed or given up on."""
        with self._lock:
            return list(self._outstanding.values())

    def all_done(self) -> bool:
        """Every task taken, and every branch consumed or given up on."""
        with self._lock:
            return self._exhausted and not self._outstanding

    def give_up(self, submitted: _Submitted) -> list[Future]:
        """Stop waiting for ``submitted`` (it is stuck): its lane takes no more branches,
        another takes its place, and the stuck lane's future is returned."""
        with self._lock:
            self._outstanding.pop(submitted.position, None)
            lane = submitted.lane
            stuck = []
            if lane is not None and not lane.retired:
                lane.retired = True
                self._live -= 1
                if lane.future is not None:
                    stuck.append(lane.future)
            self._start_lanes()
            return stuck

    def stop(self) -> list[_Submitted]:
        """Take no more tasks and drop the queued ones; return those still outstanding."""
        with self._lock:
            self._stopped = True
            self._queued.clear()
            return list(self._outstanding.values())

    def futures(self) -> list[Future]:
        """Futures of the lanes that may still run."""
        with self._lock:
            return [f for f in self._futures if not f.done()]


class _Lane:
    """One pool call running branches of a ``_Lanes`` in a row."""

    __slots__ = ("_lanes", "future", "retired")

    def __init__(self, lanes: _Lanes) -> None:
        self._lanes = lanes
        self.future: Future | None = None
        self.retired = False

    def run(self) -> None:
        lanes = self._lanes
        finished = lanes.finished
        for _ in range(LANE_BATCH):
            submitted = lanes.take(self)
            if submitted is None:
                return
            try:
                result = run_branch(submitted.task, submitted.monitor)
            except BaseException as exc:  # reported to the consumer, which raises it
                finished.put((submitted, None, exc))
            else:
                finished.put((submitted, result, None))
            del submitted
        lanes.requeue(self)


def _next_finished(finished: queue.SimpleQueue[_Finished], timeout: float | None
                   ) -> list[_Finished]:
    """What lanes reported: at least one unless ``timeout`` passes first."""
    try:
        done = [finished.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _sooner(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    return first if second is None else min(first, second)


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


def _overdue(pending: Iterable[_Submitted]) -> list[_Submitted]:
    now = time.monotonic()
    return [submitted for submitted in pending
            if (limit := submitted.task.limits.branch_timeout)
            and submitted.monitor.started_at is not None
            and now >= submitted.monitor.started_at + limit + TIMEOUT_GRACE_SECONDS]


register_backend("thread", ThreadBackend)
