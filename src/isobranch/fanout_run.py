"""The one fan-out driver: runs a planned fan-out's branches on a backend and owns every policy.

``fanout.py`` plans a fan-out (which branches, with what input, built
lazily); this module runs it. The driver hands a backend branches only as
it can start them, and at most as many as the fan-out allows at once
(``max_concurrency``, plus what the backend declares it takes ahead per
slot); counts every branch's deadline from its start and tells a backend
that can kill to end one past it; holds a failed branch through its retry
backoff (holding no worker and delaying no sibling) and hands it out again
when the backoff ends; applies ``fail_fast``; and stops at once on
cancellation, on the graph's ``close()`` (it ends a backoff) and on Ctrl-C.
A backend only starts a branch, reports what finished, and kills what it
is told to (``isolation.base``).

``drive`` is that loop: it yields each branch's final ``(position,
result)`` once, in completion order, and a ``RetryNotice`` per attempt that
runs again. ``FanOutRun`` adds what a fan-out of the step loop needs:
results placed by position with the fail-fast rule (``Gathered``), results
a resumed run recorded, and observers such as checkpoint recording; the
runner turns what it yields into events (which the progress line reads).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .branch import CANCELLED, BranchRun, BranchTask, ParallelFlowResult
from .errors import BackendError, RetriesStopped
from .retry import BRANCH_RETRY_ON, RetryPolicy, failure_names, not_retried_note

if TYPE_CHECKING:
    from .cancellation import CancelSignal
    from .fanout import FanOutPlan
    from .isolation.base import BackendFanOut, IsolationBackend

logger = logging.getLogger(__name__)

# A branch with a deadline that a backend took but has not started yet (it
# waits in a queue): the driver looks again this soon.
UNSTARTED_POLL_SECONDS = 0.05


# Told of each attempt's result as it comes in, before any retry or fail-fast decision
# (tracing takes the spans a branch sent back): ``(run, result)``.
AttemptObserver = Callable[[BranchRun, ParallelFlowResult], None]


@dataclass(frozen=True)
class RetryNotice:
    """Attempt ``result.attempts`` of the branch at ``position`` failed; it runs again in
    ``delay`` seconds (attempt ``result.attempts + 1`` of ``max_attempts``)."""

    position: int
    result: ParallelFlowResult
    max_attempts: int
    delay: float


def _nothing() -> None:
    return None


class FanOutSource:
    """The runs of one fan-out as the driver hands them to its backend.

    Retries whose backoff ended come first, then the plan's tasks, each
    built when it is taken, or when ``ready`` must know whether there is one
    (``positions``: the plan positions of ``tasks``, when some were skipped;
    None: all, in order). At most ``cap`` runs are out (taken and not yet
    released) at once. Safe from any thread (a thread backend's lanes take
    from it), unless the driver says only its own thread takes
    (``single_threaded``): then nothing is locked, which is most of what a
    branch costs the driver on the inline backend. A task that fails to
    build ends the tasks; its error is kept in ``error`` for the driver to
    raise. When the tasks end or fail in another thread than the driver's,
    ``on_change`` wakes the driver.
    """

    def __init__(self, tasks: Iterator[BranchTask], positions: Sequence[int] | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        # Each task with its position in the plan, numbered as it is built (as many
        # positions as tasks when some were skipped; count() never ends).
        self._tasks: Iterator[tuple[int, BranchTask]] = zip(
            itertools.count() if positions is None else positions, tasks, strict=False)
        self._clock = clock
        self._lock = threading.Lock()
        # What ``with`` guards the rarer operations with: the lock, or nothing.
        self._guard: contextlib.AbstractContextManager = self._lock
        # The next run, built ahead (by ``prime`` or ``ready``).
        self._next: BranchRun | None = None
        self._driver_thread = threading.get_ident()
        self._due: list[tuple[float, int, BranchRun]] = []
        self._scheduled = 0  # ties between retries due at once go in scheduling order
        # Retries wait (``_due`` is not empty); kept as a flag the driver reads unlocked.
        self.retrying = False
        self._held: set[BranchRun] | None = None
        self.exhausted = False
        self.stopped = False
        self.error: BaseException | None = None
        self.cap = sys.maxsize  # the driver sets it; this high: no bound
        self.max_concurrency: int | None = None
        self.out = 0
        # A take was refused because ``cap`` runs were out (since the last release).
        self.starved = False
        # Called (from any thread) when the tasks end or fail, to wake the driver.
        self.on_change: Callable[[], None] = _nothing

    def prime(self) -> BranchRun | None:
        """Build the first run now (its error raises here); None if the fan-out has none."""
        first = next(self._tasks, None)
        if first is None:
            self.exhausted = True
            return None
        self._next = BranchRun(first[1], first[0])
        return self._next

    def track(self) -> None:
        """Keep the runs a backend holds (``held``), for their deadlines."""
        self._held = set()

    def single_threaded(self) -> None:
        """Only the driver's thread takes and releases runs from now on: lock nothing.
        (A stop flag may still stop it from another thread: a flag and a list copy.)"""
        self._guard = contextlib.nullcontext()
        # The unlocked bodies become ``take`` and ``release`` themselves: no lock, and no
        # call through a locking wrapper, which is most of what a branch costs the driver
        # on the inline backend.
        self.take = self._take  # type: ignore[method-assign]
        self.release = self._release  # type: ignore[method-assign]

    def take(self) -> BranchRun | None:
        """The next run to start, or None when there is none now (see ``RunSource``)."""
        with self._lock:
            exhausted = self.exhausted
            run = self._take()
            ended = self.exhausted and not exhausted
        if ended:
            self._ended()
        return run

    def _take(self) -> BranchRun | None:
        """``take`` without the lock (``single_threaded`` makes it ``take`` itself)."""
        if self.stopped:
            return None
        if self.out >= self.cap:
            self.starved = True
            return None
        due = self._due
        if due and due[0][0] <= self._clock():
            run = heapq.heappop(due)[2]
            self.retrying = bool(due)
        elif self._next is not None:
            run, self._next = self._next, None
        elif self.exhausted:
            return None
        else:
            # _build_next, written out: this is once per branch.
            try:
                position, task = next(self._tasks)
            except StopIteration:
                self.exhausted = True
                return None
            except BaseException as exc:  # building a task failed: the driver raises it
                self.exhausted = True
                self.error = exc
                return None
            run = BranchRun(task, position)
        self.out += 1
        if self._held is not None:
            self._held.add(run)
        return run

    def ready(self) -> bool:
        """Whether ``take`` may hand out a run now (the next task is built to know)."""
        with self._guard:
            if self.stopped or self.out >= self.cap:
                return False
            if self._due and self._due[0][0] <= self._clock():
                return True
            ended = self._next is None and self._build_next()
            ready = self._next is not None
        if ended:
            self._ended()
        return ready

    def _build_next(self) -> bool:
        """Build the next run into ``_next``; True if the tasks ended (or failed) just now.
        Called with the lock held: the tasks are an iterator no two threads may advance."""
        if self.exhausted:
            return False
        try:
            position, task = next(self._tasks)
        except StopIteration:
            self.exhausted = True
            return True
        except BaseException as exc:  # building a task failed: the driver raises it
            self.exhausted = True
            self.error = exc
            return True
        self._next = BranchRun(task, position)
        return False

    def _ended(self) -> None:
        if threading.get_ident() != self._driver_thread:
            self.on_change()  # a backend's thread found the end: wake the driver

    def release(self, run: BranchRun) -> bool:
        """``run``'s result is in: it no longer counts as out. True if a take was refused
        for the cap meanwhile (the backend may take again now)."""
        with self._lock:
            return self._release(run)

    def _release(self, run: BranchRun) -> bool:
        """``release`` without the lock (``single_threaded`` makes it ``release`` itself)."""
        self.out -= 1
        if self._held is not None:
            self._held.discard(run)
        starved, self.starved = self.starved, False
        return starved

    def schedule(self, run: BranchRun, at: float) -> None:
        """Hand ``run`` out (a retry) once ``clock()`` reaches ``at``."""
        with self._guard:
            self._scheduled += 1
            heapq.heappush(self._due, (at, self._scheduled, run))
            self.retrying = True

    def next_due(self) -> float | None:
        """When the soonest retry is due (None: none waits)."""
        if not self._due:  # the common case, read without the lock
            return None
        with self._guard:
            return self._due[0][0] if self._due else None

    def held(self) -> list[BranchRun]:
        """The runs out and not yet released (``track`` must have been called)."""
        with self._guard:
            return list(self._held or ())

    def finished(self) -> bool:
        """Every run's result is in and nothing is left to hand out (the driver asks; the
        next task is built to know whether there is one)."""
        if self.out or self.retrying or self._next is not None:  # read without the lock:
            return False  # a run out or ready now only ends when the driver sees it
        with self._guard:
            if self.out or self._due or self._next is not None:
                return False
            if not self.stopped:
                self._build_next()
            return self._next is None

    def cancel_unstarted(self) -> None:
        """Hand out nothing more and drop what waits (the run built ahead, retries due
        later): the runs out still finish, the rest never run."""
        with self._guard:
            self.stopped = self.exhausted = True
            self._next = None
            self._due.clear()
            self.retrying = False

    def stop(self) -> list[BranchRun]:
        """Hand out nothing more; the retries that were waiting, soonest first."""
        with self._guard:
            self.stopped = True
            return [run for _, _, run in sorted(self._due, key=lambda due: due[:2])] \
                if self._due else []


class _Driver:
    """The state of one ``drive`` call."""

    def __init__(self, backend: IsolationBackend, source: FanOutSource, *,
                 max_concurrency: int | None,
                 retry_of: Callable[[int], RetryPolicy | None] | None,
                 cancel: CancelSignal | None, stop_flags: Iterable[CancelSignal],
                 clock: Callable[[], float], random: Callable[[], float] | None,
                 gathering: _Gathering | None = None,
                 attempt_observer: AttemptObserver | None = None) -> None:
        self.backend = backend
        self.attempt_observer = attempt_observer
        # FanOutRun's part: what is yielded, the fail-fast stop, the end.
        self.gathering = gathering
        self.source = source
        self.max_concurrency = max_concurrency
        self.retry_of = retry_of
        self.cancel = cancel
        self.stop_flags = list(stop_flags)
        self.clock = clock
        self.random = random
        self.work: BackendFanOut | None = None
        # Retries a stop flag ended while they waited.
        self.abandoned: list[BranchRun] = []
        self.timeout: float | None = None
        self.grace = backend.kill_grace_seconds
        # Where a final result only goes when nothing watches an attempt, no branch can
        # retry, and nobody observes or reads a note of a result (an invoke's fan-out,
        # most of them): decided once, so each branch skips the rest of ``_finish``.
        self.places_only: Gathered | None = (
            gathering.gathered if gathering is not None and attempt_observer is None
            and retry_of is None and not gathering.observers and not gathering.notes
            else None)

    def run(self) -> Iterator[tuple[int, ParallelFlowResult] | RetryNotice | BranchFinished]:
        source, backend, gathering = self.source, self.backend, self.gathering
        first = source.prime()
        if first is None:  # nothing to run (or every result recorded): no backend starts
            if gathering is not None:
                gathering.end()
            return
        limit = first.task.limits.branch_timeout
        if limit and backend.kills_overdue:
            self.timeout = limit
            source.track()
        self.work = work = backend.open(source, first.task.graph)
        if not work.takes_from_other_threads:
            source.single_threaded()
        source.max_concurrency = self.max_concurrency
        if not backend.bounds_concurrency:
            slots = max(work.slots, 1)
            at_once = self.max_concurrency or slots
            # Taken ahead only when the backend's own slots are the bound.
            ahead = backend.tasks_ahead_per_worker * slots if at_once >= slots else 0
            source.cap = at_once + ahead
        source.on_change = work.wake
        forget = [flag.add_callback(self._stop_retries) for flag in self.stop_flags]
        if self.cancel is not None:
            forget.append(self.cancel.add_callback(work.interrupt))
        completed = stop = False
        # Only a cancel signal or a stop flag can stop the loop from outside.
        checked = self.cancel is not None or bool(self.stop_flags)
        deadlines = self.timeout is not None
        # Bound once: this loop runs once per branch on the inline backend.
        start, collect, is_finished, finish = work.start, work.collect, source.finished, \
            self._finish
        try:
            self._check()
            while not stop:
                start()
                if checked:
                    self._check()
                # Runs still out cannot have finished (read unlocked: only the driver
                # releases them); otherwise the source must build ahead to know.
                finished = not source.out and is_finished()
                if source.error is not None:
                    raise source.error
                if finished:
                    break
                reports = collect(self._wait() if deadlines or source.retrying else None)
                if checked:
                    self._check()
                for run, result in reports:
                    if run.done:
                        continue
                    item, stop = finish(run, result)
                    if item is not None:
                        yield item
                    if stop:
                        break
                if deadlines and not stop:
                    for run in self._overdue():
                        killed = work.kill(run)
                        if killed is None:
                            continue
                        item, stop = self._finish(run, killed)
                        if item is not None:
                            yield item
                        if stop:
                            break
            completed = True
        finally:
            for unregister in forget:
                unregister()
            source.stop()
            work.close(cancelled=self.cancel is not None and self.cancel.is_set())
        if completed and gathering is not None:
            if gathering.cancels_unstarted:
                yield from gathering.cancel_unstarted()
            gathering.end()

    def _check(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_set()
        if self.abandoned:
            run = self.abandoned[0]
            more = f" (and {len(self.abandoned) - 1} more)" if len(self.abandoned) > 1 else ""
            raise RetriesStopped(f"stopped (the graph was closed or the run cancelled) while "
                                 f"branch {run.task.name!r}{more} waited for attempt "
                                 f"{run.attempt}")

    def _stop_retries(self) -> None:
        # A stop flag (close(), a cancelled branch around this fan-out): from any thread.
        self.abandoned = self.source.stop()
        if self.work is not None:
            self.work.wake()

    def _wait(self) -> float | None:
        """How long ``collect`` may wait: until the next retry is due or deadline passes."""
        timeout = None
        due = self.source.next_due()
        # A retry already due waits for room in the backend, which a result makes:
        # waking for it now would only spin.
        if due is not None and (wait := due - self.clock()) > 0:
            timeout = wait
        if self.timeout is not None:
            now = time.monotonic()
            for run in self.source.held():
                started = run.started_at
                wait = UNSTARTED_POLL_SECONDS if started is None else max(
                    started + self.timeout + self.grace - now, 0.0)
                timeout = wait if timeout is None else min(timeout, wait)
        return timeout

    def _overdue(self) -> list[BranchRun]:
        assert self.timeout is not None
        now = time.monotonic()
        late = self.timeout + self.grace
        return [run for run in self.source.held() if not run.done
                and run.started_at is not None and now >= run.started_at + late]

    def _finish(self, run: BranchRun, result: ParallelFlowResult
                ) -> tuple[tuple[int, ParallelFlowResult] | RetryNotice | BranchFinished | None,
                           bool]:
        """``run``'s result is in: what to yield for it (its final result, or the notice of a
        retry now scheduled; None: nothing), and whether the fan-out must stop."""
        run.done = True
        source = self.source
        if source.release(run):
            assert self.work is not None
            self.work.start()  # room again for a backend that was refused
        result.attempts = run.attempt
        if self.places_only is not None:
            return None, self._stops(self.places_only.place(run.position, result))
        if self.attempt_observer is not None:  # told of every attempt, retried ones too
            self.attempt_observer(run, result)
        if self.retry_of is not None and not result.success and not result.interrupts:
            notice = self._retry(run, result)
            if notice is not None:
                notes = self.gathering is None or self.gathering.notes
                return (notice if notes else None), False
        gathering = self.gathering
        if gathering is None:
            return (run.position, result), False
        # FanOutRun's part, written out here: it runs once per branch.
        stop = self._stops(gathering.gathered.place(run.position, result))
        for observer in gathering.observers:
            observer.branch_finished(run.position, result)
        if not gathering.notes:
            return None, stop
        return BranchFinished(run.position, result, gathering.gathered.done,
                              gathering.plan.total), stop

    def _stops(self, failed_first: bool) -> bool:
        """Whether the fan-out stops now that a branch failed first (``failed_first``); a
        fan-out that cancels only its unstarted branches goes on with those running."""
        if failed_first and self.gathering is not None and self.gathering.cancels_unstarted:
            self.source.cancel_unstarted()
            return False
        return failed_first

    def _retry(self, run: BranchRun, result: ParallelFlowResult) -> RetryNotice | None:
        """Schedule ``run`` again if its policy allows (its notice); else say in its error
        which attempt failed (None)."""
        policy = self.retry_of(run.position) if self.retry_of is not None else None
        if policy is None:
            return None
        if run.attempt < policy.max_attempts and not self.source.stopped and policy.retries(
                failure_names(result.error_type, result.error_bases), BRANCH_RETRY_ON):
            delay = policy.delay(run.attempt, self.random)
            logger.warning("branch %r failed on attempt %d of %d (%s); retrying in %.3gs",
                           run.task.name, run.attempt, policy.max_attempts,
                           result.error_type, delay)
            self.source.schedule(BranchRun(run.task, run.position, run.attempt + 1),
                                 self.clock() + delay)
            return RetryNotice(run.position, result, policy.max_attempts, delay)
        if policy.max_attempts > 1 and result.error_type != CANCELLED:
            note = "" if self.source.stopped else not_retried_note(
                policy, run.attempt, result.error_type,
                failure_names(result.error_type, result.error_bases), BRANCH_RETRY_ON)
            result.error = (f"branch {run.task.name!r} failed on attempt {run.attempt} of "
                            f"{policy.max_attempts}{note}: {result.error}")
        return None


def drive(backend: IsolationBackend, tasks: Iterable[BranchTask], *,
          positions: Sequence[int] | None = None, max_concurrency: int | None = None,
          retry_of: Callable[[int], RetryPolicy | None] | None = None,
          cancel: CancelSignal | None = None, stop_flags: Iterable[CancelSignal] = (),
          clock: Callable[[], float] = time.monotonic,
          random: Callable[[], float] | None = None,
          ) -> Iterator[tuple[int, ParallelFlowResult] | RetryNotice]:
    """Run ``tasks`` on ``backend``; yield each branch's final ``(position, result)`` as it
    finishes, and a ``RetryNotice`` for each attempt that runs again.

    ``positions`` are the fan-out positions of ``tasks`` (None: 0, 1, ...).
    At most ``max_concurrency`` branches run at once (None: the backend's
    slots). ``retry_of(position)`` is the retry policy of a branch (None:
    no retries); a final failure after retries says which attempt failed.
    A set ``cancel`` stops the fan-out at once and raises its error; one of
    ``stop_flags`` (the graph's ``close()``) ends every backoff at once
    (``RetriesStopped``). Closing the generator early stops every branch
    still running before ``close()`` returns. No fail-fast rule is applied
    here (``FanOutRun`` does).
    """
    driver = _Driver(backend, FanOutSource(iter(tasks), positions, clock=clock),
                     max_concurrency=max_concurrency, retry_of=retry_of, cancel=cancel,
                     stop_flags=stop_flags, clock=clock, random=random)
    return driver.run()


def triggers_fail_fast(result: ParallelFlowResult) -> bool:
    """The fail-fast rule: a failed branch stops its siblings, unless it was itself cancelled
    (or it paused for answers: a pause is no failure)."""
    return not result.success and result.error_type != CANCELLED and not result.interrupts


def fail_fast_reason(failure: ParallelFlowResult) -> str:
    """Why the siblings of ``failure`` were cancelled (every backend says the same)."""
    return f"cancelled: branch {failure.branch!r} failed first (fail_fast)"


class Gathered:
    """Results of one fan-out placed by position, with the fail-fast rule applied once.

    ``add`` returns True when the fan-out must stop (fail_fast and a real
    failure); ``finish`` fills every branch that has no result with a
    cancelled one and returns them all in position order.
    """

    def __init__(self, total: int, fail_fast: bool, backend: str) -> None:
        self.results: list[ParallelFlowResult | None] = [None] * total
        self.fail_fast = fail_fast
        self.backend = backend
        self.done = 0
        self.failed = 0
        self.failure: ParallelFlowResult | None = None

    def add(self, position: int, result: ParallelFlowResult) -> bool:
        """Record ``result`` for ``position``; True if the fan-out must stop now."""
        if not isinstance(position, int) or not 0 <= position < len(self.results):
            raise BackendError(f"backend {self.backend!r} reported a result for branch "
                               f"position {position!r} of {len(self.results)}")
        return self.place(position, result)

    def place(self, position: int, result: ParallelFlowResult) -> bool:
        """``add`` for a position the driver itself handed out (so one of the plan's)."""
        if self.results[position] is not None:
            raise BackendError(f"backend {self.backend!r} reported branch {position} twice")
        if not isinstance(result, ParallelFlowResult):
            raise BackendError(f"backend {self.backend!r} returned a {type(result).__name__} "
                               f"instead of a ParallelFlowResult")
        self.results[position] = result
        self.done += 1
        if not result.success:
            self.failed += 1
        if self.fail_fast and self.failure is None and triggers_fail_fast(result):
            self.failure = result
            return True
        return False

    def missing(self) -> list[int]:
        """Positions that have no result."""
        return [i for i, result in enumerate(self.results) if result is None]

    def finish(self, names: Callable[[int], str], indexes: Callable[[int], int | None],
               isolation: str) -> list[ParallelFlowResult]:
        """Every result in order; branches without one are cancelled (after a fail_fast stop)."""
        cancelled = 0
        if self.failure is not None:
            reason = fail_fast_reason(self.failure)
            for position in self.missing():
                self.results[position] = ParallelFlowResult(
                    branch=names(position), index=indexes(position), success=False,
                    error=reason, error_type=CANCELLED, isolation=isolation)
                cancelled += 1
        if self.done + cancelled == len(self.results):  # every branch has one now
            return list(self.results)  # type: ignore[arg-type]
        missing = self.missing()
        raise BackendError(f"backend {self.backend!r} returned {self.done} results for "
                           f"{len(self.results)} branches (none for "
                           f"{', '.join(names(i) for i in missing[:5])}"
                           f"{', ...' if len(missing) > 5 else ''})")


class FanOutObserver(Protocol):
    """Told about a fan-out as it runs (checkpoint recording is one)."""

    def branch_finished(self, position: int, result: ParallelFlowResult) -> None:
        """Branch ``position`` has its final result."""

    def fan_out_finished(self) -> None:
        """Every branch that will finish has (the fan-out was not stopped by an error)."""


@dataclass(slots=True)
class BranchFinished:
    """Branch ``position`` has its final ``result``; ``done`` of ``total`` have one now."""

    position: int
    result: ParallelFlowResult
    done: int
    total: int


class _Gathering:
    """What ``FanOutRun`` adds to the driver's loop (which applies it to each final result
    itself): results placed by position with the fail-fast rule, observers told of each
    final result and of the end, and the notes the caller wants (none with
    ``notes=False``)."""

    def __init__(self, gathered: Gathered, plan: FanOutPlan, isolation: str,
                 observers: Sequence[FanOutObserver], notes: bool,
                 cancels_unstarted: bool = False) -> None:
        self.gathered = gathered
        # A failure cancels only the branches not yet handed out (see FanOutRun).
        self.cancels_unstarted = cancels_unstarted
        self.plan = plan
        self.isolation = isolation
        self.observers = observers
        self.notes = notes
        self.results: list[ParallelFlowResult] = []

    def cancel_unstarted(self) -> Iterator[BranchFinished]:
        """After a failure that cancelled the branches not yet started: give each its
        cancelled result as a final one, so observers and the caller's notes see every
        branch of the fan-out finish, not only those that ran."""
        gathered = self.gathered
        if gathered.failure is None:
            return
        plan, reason = self.plan, fail_fast_reason(gathered.failure)
        for position in gathered.missing():
            result = ParallelFlowResult(branch=plan.names(position),
                                        index=plan.indexes(position), success=False,
                                        error=reason, error_type=CANCELLED,
                                        isolation=self.isolation)
            gathered.place(position, result)
            for observer in self.observers:
                observer.branch_finished(position, result)
            if self.notes:
                yield BranchFinished(position, result, gathered.done, plan.total)

    def end(self) -> None:
        """The fan-out ended (every branch finished, or fail_fast stopped it)."""
        for observer in self.observers:
            observer.fan_out_finished()
        plan = self.plan
        self.results = self.gathered.finish(plan.names, plan.indexes, self.isolation)


class FanOutRun:
    """One planned fan-out run to its results on ``backend``.

    Iterating runs it and yields a ``BranchFinished`` per branch as it
    finishes and a ``RetryNotice`` per attempt that runs again (nothing
    with ``notes=False``: a caller that wants no events); afterwards
    ``results`` holds every result in plan order (branches a ``fail_fast``
    stop left unrun are cancelled ones) and ``failure`` the branch that
    stopped it, if any. ``recorded`` are results a resumed run already has,
    by position: those branches do not run again. ``observers`` are told of
    every final result and of the end; ``attempt_observer`` of every
    attempt's result first (a retried one too). With ``fail_fast`` and
    ``cancel_unstarted``, the first failure cancels only the branches not
    yet handed to the backend: those out finish, the fan-out ends normally
    with the cancelled ones among ``results``, and ``failure`` stays None.
    """

    def __init__(self, backend: IsolationBackend, plan: FanOutPlan, *, fail_fast: bool,
                 max_concurrency: int | None = None,
                 retry_of: Callable[[int], RetryPolicy | None] | None = None,
                 cancel: CancelSignal | None = None, stop_flags: Iterable[CancelSignal] = (),
                 recorded: Mapping[int, ParallelFlowResult] | None = None,
                 observers: Sequence[FanOutObserver] = (), notes: bool = True,
                 attempt_observer: AttemptObserver | None = None,
                 cancel_unstarted: bool = False) -> None:
        self._plan = plan
        gathered = Gathered(plan.total, fail_fast, backend.name)
        recorded = dict(recorded or {})
        for position, result in sorted(recorded.items()):
            gathered.add(position, result)
        self._gathering = _Gathering(gathered, plan, backend.name, list(observers), notes,
                                     cancels_unstarted=fail_fast and cancel_unstarted)
        tasks: Iterable[BranchTask] = plan.tasks
        positions = None
        if recorded:
            positions = [p for p in range(plan.total) if p not in recorded]
            tasks = (task for p, task in enumerate(plan.tasks) if p not in recorded)
        self._driver = _Driver(backend, FanOutSource(iter(tasks), positions),
                               max_concurrency=max_concurrency, retry_of=retry_of,
                               cancel=cancel, stop_flags=stop_flags, clock=time.monotonic,
                               random=None, gathering=self._gathering,
                               attempt_observer=attempt_observer)

    @property
    def results(self) -> list[ParallelFlowResult]:
        """Every result in plan order, once the run ended."""
        return self._gathering.results

    @property
    def done(self) -> int:
        """How many branches have their final result."""
        return self._gathering.gathered.done

    @property
    def total(self) -> int:
        """How many branches the fan-out has."""
        return self._plan.total

    @property
    def failure(self) -> ParallelFlowResult | None:
        """The failed branch that stopped the fan-out under ``fail_fast``, if any."""
        if self._gathering.cancels_unstarted:
            return None  # it cancelled the unstarted branches; the fan-out did not stop
        return self._gathering.gathered.failure

    def __iter__(self) -> Iterator[BranchFinished | RetryNotice]:
        # The driver's own loop: no generator layer of its own per branch. Closing it
        # stops whatever still runs (fail_fast, an exception, a consumer that stopped
        # reading) before the fan-out is left.
        return self._driver.run()
