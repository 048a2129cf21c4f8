"""Branch retries inside a running fan-out.

A failed branch whose retry policy allows another attempt is not reported:
it is put back into the fan-out's task source, due after its backoff, as a
brand-new task (its input copied again from the fan-out's snapshot, so a
fresh VM and, on a process backend, whichever worker is free; a worker that
died was already replaced). The backoff holds no worker: until a retry is
due the source answers ``NotReady``, and the backend keeps running and
reporting the siblings meanwhile. The stream the runner sees yields each
branch's final result once, plus a ``RetryNotice`` for every attempt that
will be retried.

A backend whose ``stream_branches`` does not accept ``NotReady`` gets a
finite source instead: the fan-out then runs in rounds, each round starting
when its first retry is due, so a retry waits for the siblings of its round.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .branch import CANCELLED, BranchTask, ParallelFlowResult
from .errors import BackendError, RetriesStopped
from .isolation.base import NotReady, accepts_not_ready, stream_results
from .retry import BRANCH_RETRY_ON, RetryPolicy, failure_names, not_retried_note, wait_unless

if TYPE_CHECKING:
    from .cancellation import CancelSignal
    from .isolation.base import IsolationBackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryNotice:
    """Attempt ``result.attempts`` of the branch at ``position`` failed; it runs again in
    ``delay`` seconds (attempt ``result.attempts + 1`` of ``max_attempts``)."""

    position: int
    result: ParallelFlowResult
    max_attempts: int
    delay: float


class RetryFeed:
    """The task source of a fan-out with retries: due retries first, then new tasks.

    Positions the backend reports are the order tasks were handed out in;
    ``returned`` maps one back to the branch's position in the fan-out and
    its attempt. Safe to use from the backend's threads and the consumer's.
    """

    def __init__(self, tasks: Iterator[BranchTask], *, finite: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tasks = tasks
        self._finite = finite
        self._clock = clock
        self._lock = threading.Lock()
        self._due: list[tuple[float, int, int, BranchTask, int]] = []
        self._order = itertools.count()
        self._next_position = 0
        self._exhausted = False
        self._handed: list[tuple[int, BranchTask, int] | None] = []
        self._in_flight = 0
        self._waker: Callable[[], None] | None = None
        self.stopped = False

    def __iter__(self) -> RetryFeed:
        return self

    def __next__(self) -> BranchTask | NotReady:
        with self._lock:
            if self.stopped:
                raise StopIteration
            if self._due and self._due[0][0] <= self._clock():
                _, _, position, task, attempt = heapq.heappop(self._due)
                return self._hand(position, task, attempt)
            if not self._exhausted:
                try:
                    task = next(self._tasks)
                except StopIteration:
                    self._exhausted = True
                else:
                    self._next_position += 1
                    return self._hand(self._next_position - 1, task, 1)
            if self._finite:
                raise StopIteration
            if self._due:
                return NotReady(self._due[0][0])
            if self._in_flight:
                return NotReady(None)
            raise StopIteration

    def _hand(self, position: int, task: BranchTask, attempt: int) -> BranchTask:
        self._handed.append((position, task, attempt))
        self._in_flight += 1
        return task

    def returned(self, handed_position: int) -> tuple[int, BranchTask, int]:
        """``(position in the fan-out, task, attempt)`` of the task handed out
        ``handed_position``-th (this round), whose result the backend reported."""
        with self._lock:
            entry = self._handed[handed_position] if 0 <= handed_position < len(
                self._handed) else None
            if entry is None:
                raise BackendError(f"the backend reported task {handed_position!r} of this "
                                   f"fan-out, which it was not given or reported before")
            self._handed[handed_position] = None
            self._in_flight -= 1
            return entry

    def schedule(self, position: int, task: BranchTask, attempt: int, at: float) -> None:
        """Hand ``task`` out again as ``attempt`` once ``clock()`` reaches ``at``."""
        with self._lock:
            heapq.heappush(self._due, (at, next(self._order), position, task, attempt))

    def set_waker(self, callback: Callable[[], None]) -> None:
        """Called by a backend: ``callback`` wakes it when the source changes early."""
        self._waker = callback

    def stop(self) -> None:
        """Hand out nothing more, and wake the backend so it notices."""
        with self._lock:
            self.stopped = True
            waker = self._waker
        if waker is not None:
            waker()

    def waiting(self) -> list[tuple[float, int, BranchTask, int]]:
        """The retries not yet handed out: ``(due, position, task, attempt)``, soonest first."""
        with self._lock:
            return [(at, position, task, attempt)
                    for at, _, position, task, attempt in sorted(self._due)]

    def new_round(self) -> None:
        """The backend's stream ended: the next one counts its positions from 0 again."""
        with self._lock:
            self._handed = []
            self._in_flight = 0


def stream_with_retries(backend: IsolationBackend, tasks: Iterator[BranchTask],
                        max_concurrency: int | None, *,
                        policy_of: Callable[[int], RetryPolicy | None],
                        stop_flags: Iterable[CancelSignal],
                        cancel: CancelSignal | None = None,
                        clock: Callable[[], float] = time.monotonic,
                        random: Callable[[], float] | None = None,
                        ) -> Iterator[tuple[int, ParallelFlowResult] | RetryNotice]:
    """Run ``tasks`` on ``backend`` like ``stream_results``, retrying failed branches.

    Yields each branch's final ``(position, result)`` once (``result.attempts``
    set, and the error saying which attempt failed) and a ``RetryNotice`` per
    attempt that will run again. Setting one of ``stop_flags`` ends every
    backoff at once (``RetriesStopped`` if a retry was still waiting; the
    run's ``cancel``, also passed to the backend, raises its own error).
    """
    feed = RetryFeed(tasks, finite=not accepts_not_ready(backend), clock=clock)
    flags = list(stop_flags)
    forget = [flag.add_callback(feed.stop) for flag in flags]
    try:
        while True:
            inner = stream_results(backend, feed, max_concurrency, cancel)
            try:
                for handed, result in inner:
                    position, task, attempt = feed.returned(handed)
                    result.attempts = attempt
                    policy = policy_of(position)
                    if result.success or policy is None:
                        yield position, result
                        continue
                    if attempt < policy.max_attempts and not feed.stopped and policy.retries(
                            failure_names(result.error_type, result.error_bases),
                            BRANCH_RETRY_ON):
                        delay = policy.delay(attempt, random)
                        logger.warning("branch %r failed on attempt %d of %d (%s); retrying in "
                                       "%.3gs", task.label, attempt, policy.max_attempts,
                                       result.error_type, delay)
                        feed.schedule(position, task, attempt + 1, clock() + delay)
                        yield RetryNotice(position, result, policy.max_attempts, delay)
                        continue
                    if policy.max_attempts > 1 and result.error_type != CANCELLED:
                        note = "" if feed.stopped else not_retried_note(
                            policy, attempt, result.error_type,
                            failure_names(result.error_type, result.error_bases), BRANCH_RETRY_ON)
                        result.error = (f"branch {task.label!r} failed on attempt {attempt} of "
                                        f"{policy.max_attempts}{note}: {result.error}")
                    yield position, result
            finally:
                close = getattr(inner, "close", None)
                if close is not None:
                    close()
            waiting = feed.waiting()
            if not waiting:
                return
            if not feed.stopped:
                # The backend's stream ended with retries still due (a finite
                # source): the next round starts when the first is due.
                wait_unless(waiting[0][0] - clock(), flags)
            if cancel is not None:
                cancel.raise_if_set()
            if feed.stopped:
                _, _, task, attempt = waiting[0]
                more = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
                raise RetriesStopped(f"stopped (the graph was closed or the run cancelled) "
                                     f"while branch {task.label!r}{more} waited for attempt "
                                     f"{attempt}")
            feed.new_round()
    finally:
        for unregister in forget:
            unregister()
