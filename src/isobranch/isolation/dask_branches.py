"""The Dask backend's view of one fan-out's branches, and which of their runs count.

``FollowedBranch`` is one branch's task as the client follows it (every
start a worker confirmed, its node); ``FanOutWatch`` what a fan-out's
branches share. ``RunLedger`` is the retry bookkeeping: which workers this
backend restarted and when, so a branch killed by such a restart is not
counted against its ``retries``; which branch caused a worker's death, so
one that only shared the worker with it is not counted either; and a branch
the scheduler re-ran more often than that is failed. ``StoppedUnheard`` keeps
the tasks a fan-out stopped before their starts reached the client, whose
workers are restarted when they do. ``MemoryRestarts`` collects the workers a nanny
restarted for memory. The functions below describe a failed branch, and a
graph a worker cannot load. ``TaskAlreadyClaimed`` is what a task raises when
an earlier run of its key claimed it (``dask_worker``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future as ProbeFuture
from dataclasses import dataclass, field
from typing import Any

from ..branch import BranchRun, BranchTask, ParallelFlowResult, failed_result
from ..error_kinds import ErrorKind
from ..errors import TaskAlreadyClaimed
from .by_value import ENGINE_PACKAGES
from .dask_cluster import Connection

logger = logging.getLogger(__name__)

# A restart is remembered this long, to tell a branch it killed from a death.
RESTART_MEMORY_SECONDS = 120.0
# The longest a fan-out waits for one result fetched on its own.
FETCH_SECONDS = 2.0
# A branch that died with its worker this many times, each time beside other started
# branches none of which could be told to be the cause, is taken as the cause: a
# crasher that always shares its worker must not run for ever.
SHARED_DEATHS_LIMIT = 3


@dataclass
class FanOutWatch:
    """What the branches of one fan-out share on the client side."""

    # Futures as they finish (their done callbacks put them here).
    finished: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # When the scheduler last showed signs of life to this fan-out.
    heard_at: float = field(default_factory=time.monotonic)
    probe: ProbeFuture | None = None
    no_workers_since: float | None = None
    # The fan-out's ``BatchSizer``, told how long each finished task ran.
    sizer: Any = None
    # The ids of the claims its tasks' first runs hold on the scheduler (let go at its end).
    claims: list[str] = field(default_factory=list)


@dataclass
class FollowedBranch:
    """One branch's task as the client follows it."""

    run: BranchRun
    fan_out: FanOutWatch
    key: str = ""
    # The future of its current submission.
    future: Any = None
    # (client-side arrival time, worker address) of every start the workers
    # confirmed, over every submission. Starts are confirmed before the
    # branch runs, so more starts than retries allow means the scheduler
    # itself re-ran the task after its worker died.
    starts: list[tuple[float, str]] = field(default_factory=list)
    # Where the current submission's starts begin in ``starts``.
    current: int = 0
    node: str | None = None
    # The ``FollowedBatch`` it runs in, while it runs in one (None: a task of its own).
    batch: Any = None
    # How many starts there were when the current submission first finished (None: it
    # has not): a later start is the scheduler computing again a result that died
    # with its worker before it was fetched, not a re-run after a crash.
    finished_after: int | None = None
    # Indices in ``starts`` of runs that died with a worker another branch killed (or
    # may have): they do not count against ``retries``.
    spared: set[int] = field(default_factory=set)
    # Deaths it shared with other started branches, none of them told to be the cause.
    shared_deaths: int = 0

    def on_done(self, future: Any) -> None:
        """The future's done callback (on the client's event-loop thread, which also
        appends the starts)."""
        if future.status == "finished" and self.finished_after is None:
            self.finished_after = len(self.starts)
        self.fan_out.finished.put(future)

    @property
    def task(self) -> BranchTask:
        """The branch's task."""
        return self.run.task

    @property
    def running_on(self) -> str | None:
        """The worker the current submission runs on, once it has started."""
        return self.starts[-1][1] if len(self.starts) > self.current else None

    @property
    def started_at(self) -> float | None:
        """When the current submission started (client clock)."""
        return self.starts[-1][0] if len(self.starts) > self.current else None

    def ran_on(self, worker: str) -> bool:
        """Whether the current submission started on ``worker`` (not only queued there)."""
        return any(where == worker for _, where in self.starts[self.current:])

    def started_on(self, worker: str) -> float | None:
        """When the current submission last started on ``worker`` (client clock), if it did."""
        times = [at for at, where in self.starts[self.current:] if where == worker]
        return times[-1] if times else None

    def unfinished(self) -> bool:
        """Whether no finish of the current submission has been seen."""
        return self.finished_after is None


@dataclass
class WorkerDeath:
    """One worker's death as the client judged it, when the first task it killed was seen.

    ``cause`` is the task (a ``FollowedBranch`` or a batch) that was running
    there when it died, if that can be told: the only task that had started
    there and was not seen to finish, or, on a worker of one thread, the last
    of them to start (one thread runs one task at a time, so every earlier
    one had finished; their results only had not reached the scheduler yet,
    which then counts them as killed too). With several started tasks on a
    worker of several threads, None: any of them may have killed it.
    """

    at: float
    cause: Any


class RunLedger:
    """Which runs of a branch count against ``retries``: not those on a worker this
    backend restarted (a branch it gave up on, or stopped), which did not fail.

    ``lock`` is the backend's: the client's event-loop thread appends starts under it.
    """

    def __init__(self, retries: int, lock: threading.Lock) -> None:
        self.retries = retries
        self._lock = lock
        # Workers this backend restarted: address -> when (client clock).
        self._restarted: dict[str, float] = {}
        # Worker threads, as each worker reported them with a start: address -> threads.
        self._threads: dict[str, int] = {}
        # Workers seen dead, and which task killed each: address -> its death.
        self._deaths: dict[str, WorkerDeath] = {}

    def worker_started(self, worker: str, threads: Any) -> None:
        """A task started on ``worker``, which runs ``threads`` tasks at once. The caller
        holds the lock (the event-loop thread, appending the start)."""
        if isinstance(threads, int) and threads > 0:
            self._threads[worker] = threads

    def worker_died(self, dead: str, tasks: Iterable[Any]) -> None:
        """``dead`` killed a task: judge once which of ``tasks`` (every branch and batch
        followed, the one that just failed included, before any runs again) was the cause.

        Every start on ``dead`` reached the client before any task it killed
        did (the scheduler sends both, in that order), so the tasks that had
        started there and were not seen to finish are all known here.
        """
        now = time.monotonic()
        with self._lock:
            if dead in self._deaths:
                return
            for worker, death in list(self._deaths.items()):
                if death.at < now - RESTART_MEMORY_SECONDS:
                    del self._deaths[worker]
            started: dict[int, tuple[float, Any]] = {}
            for task in tasks:
                at = _unfinished_start(task, dead)
                if at is not None:
                    started[id(task)] = (at, task)
            runs_at_once = self._threads.pop(dead, None)
            cause = None
            if len(started) == 1 or (started and runs_at_once == 1):
                cause = max(started.values(), key=lambda start: start[0])[1]
            self._deaths[dead] = WorkerDeath(now, cause)

    def exonerated(self, branch: FollowedBranch, dead: str) -> bool:
        """Whether another task is known to have killed ``dead`` (not ``branch``)."""
        with self._lock:
            death = self._deaths.get(dead)
            return death is not None and death.cause is not None and death.cause is not branch

    def result_lost(self, branch: FollowedBranch) -> None:
        """The current run of ``branch`` finished, but its result died with its worker
        before it was fetched: the branch runs again, and the run that finished does
        not count."""
        with self._lock:
            first = branch.current
            # Its first start only (the one run that claimed its key).
            branch.spared.update(range(first, min(first + 1, len(branch.starts))))

    def _counts_death(self, branch: FollowedBranch, dead: str) -> bool:
        """Whether the death of ``dead`` (where ``branch`` ran) counts against ``branch``:
        it was the cause, or it shared ``SHARED_DEATHS_LIMIT`` deaths none was blamed for.
        A death that does not count spares the run from ``retries``. Under the lock."""
        death = self._deaths.get(dead)
        if death is None or death.cause is branch:
            return True
        if death.cause is None:
            branch.shared_deaths += 1
            if branch.shared_deaths >= SHARED_DEATHS_LIMIT:
                return True
        branch.spared.update(number for number in range(branch.current, len(branch.starts))
                             if branch.starts[number][1] == dead)
        return False

    def restarting(self, workers: list[str]) -> None:
        """Remember that ``workers`` are being restarted now (and forget old restarts)."""
        now = time.monotonic()
        with self._lock:
            for worker in workers:
                self._restarted[worker] = now
            for worker, when in list(self._restarted.items()):
                if when < now - RESTART_MEMORY_SECONDS:
                    del self._restarted[worker]

    def may_run_again(self, branch: FollowedBranch, dead: str) -> bool:
        """Whether a branch killed with worker ``dead`` is submitted again."""
        with self._lock:
            restarted = self._restarted.get(dead, 0.0) > time.monotonic() - RESTART_MEMORY_SECONDS
            ran_there = branch.ran_on(dead)
            # Killed beside the branch that killed the worker (or may have): not its failure.
            caused = ran_there and not restarted and self._counts_death(branch, dead)
        if restarted or not caused:
            # Killed by a restart isobranch asked for, queued on a worker that died
            # before it started, or one that another branch killed: not its failure.
            return True
        return self.attempts(branch) <= self.retries

    def attempts(self, branch: FollowedBranch) -> int:
        """How often the branch ran, not counting runs on workers isobranch restarted."""
        return len(self._counted_runs(branch))

    def rerun_failure(self, branch: FollowedBranch, address: str) -> ParallelFlowResult | None:
        """A failed result if the scheduler at ``address`` re-ran the branch more often
        than ``retries`` allows."""
        runs = self._counted_runs(branch)
        if len(runs) <= self.retries + 1:
            return None
        # The scheduler's allowed-failures is above isobranch's retries.
        dead, rerun_on = runs[-2], runs[-1]
        plural = "y" if self.retries == 1 else "ies"
        return failed(branch, f"Dask worker {dead} died while running it (the scheduler at "
                      f"{address} re-ran it on {rerun_on}; isobranch allows "
                      f"{self.retries} retr{plural})", ErrorKind.WORKER_DIED)

    def _counted_runs(self, branch: FollowedBranch) -> list[str]:
        with self._lock:
            # Starts after the branch finished once computed a lost result again.
            return [worker for number, (at, worker) in enumerate(
                        branch.starts[:branch.finished_after])
                    if self._restarted.get(worker, -1.0) < at and number not in branch.spared]


def _unfinished_start(task: Any, worker: str) -> float | None:
    """When ``task`` (a branch or a batch) last started on ``worker``, if its current run
    did and was not seen to finish there."""
    if isinstance(task, FollowedBranch):
        if task.batch is not None:
            return None  # its batch is the task that runs
        return task.started_on(worker) if task.unfinished() else None
    future = getattr(task, "future", None)
    if future is not None and future.status == "finished":
        return None
    times = [at for at, where in task.starts if where == worker]
    return times[-1] if times else None


class StoppedUnheard:
    """Keys of tasks a fan-out stopped before the client heard that they started, each
    with when (client clock).

    A worker confirms a start with the scheduler before the branch runs, but the
    scheduler passes it on to the client later; a fan-out stopped in between (a
    cancelled run that saw its branch running, ``fail_fast``) cannot tell where the
    task runs. Its start, when it arrives, restarts that worker. Used under the
    backend's lock; a key is forgotten after ``RESTART_MEMORY_SECONDS`` (a stopped task
    that had not started by then never will: the scheduler has cancelled it).
    """

    def __init__(self) -> None:
        self._keys: dict[str, float] = {}

    def add(self, keys: Iterable[str]) -> None:
        """Remember ``keys`` as stopped now (and forget keys stopped long ago)."""
        now = time.monotonic()
        for key, when in list(self._keys.items()):
            if when < now - RESTART_MEMORY_SECONDS:
                del self._keys[key]
        self._keys.update((key, now) for key in keys)

    def take(self, key: str) -> bool:
        """Whether ``key`` was stopped before its start was heard (forgetting it)."""
        return self._keys.pop(key, None) is not None


class MemoryRestarts:
    """Workers of the local cluster their nannies restarted for memory (address ->
    resident bytes at the time), as the events arrive on the client's event-loop thread."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._seen = threading.Condition()

    def on_event(self, event: tuple[float, dict]) -> None:
        """The topic callback: a nanny restarted a worker for memory."""
        _, message = event
        with self._seen:
            self._used[str(message.get("worker"))] = int(message.get("rss") or 0)
            self._seen.notify_all()

    def used_by(self, worker: str, timeout: float) -> int | None:
        """What ``worker`` used when restarted for memory, waiting up to ``timeout`` seconds
        for that event (it travels apart from the task's failure); None if it was not."""
        with self._seen:
            self._seen.wait_for(lambda: worker in self._used, timeout=timeout)
            return self._used.get(worker)


def failed(branch: FollowedBranch, reason: str, error_type: str) -> ParallelFlowResult:
    """The failed result of ``branch`` for ``reason``, with the state it started from."""
    task = branch.task
    return failed_result(
        task, f"branch {task.name!r}: {reason}", error_type, state=task.initial_state(),
        isolation="dask", worker=branch.starts[-1][1] if branch.starts else None,
        node=branch.node)


def dead_worker(error: BaseException | None) -> str | None:
    """The address of the worker whose death failed the task, if that is what happened."""
    if type(error).__name__ != "KilledWorker":
        return None
    last = getattr(error, "last_worker", None)
    return str(getattr(last, "address", last)) if last is not None else "(unknown worker)"


def describe_failure(branch: FollowedBranch, status: str, error: BaseException | None,
                     dead: str | None, connection: Connection) -> str:
    """Why the Dask task of ``branch`` ended as ``status`` (its worker died, it raised, …)."""
    if dead is not None:
        runs = len(branch.starts)
        tried = f" (it ran {runs} times)" if runs > 1 else ""
        if branch.shared_deaths >= SHARED_DEATHS_LIMIT:
            tried = (f" (its worker died in {branch.shared_deaths} of its runs, each time "
                     f"running other branches too, and no other branch was the cause)")
        return f"Dask worker {dead} died while running it{tried}"
    if error is not None:
        # A missing module (the engine, or one a map item's class is defined
        # in) is named with what to install.
        return f"the Dask task failed on the worker: {load_failure(error, {})}"
    if connection.client.status != "running":
        return (f"lost the connection to the Dask scheduler at {connection.address} "
                f"(the task is {status})")
    return f"the Dask scheduler at {connection.address} dropped the task (status {status!r})"


def load_failure(exc: BaseException, by_reference: Mapping[str, str]) -> str:
    """Why the graph (or the plugin carrying it) cannot be loaded on a Dask worker, and
    what to do about it: a missing module is named, with how to provide it."""
    text = f"{type(exc).__name__}: {exc}"
    module = exc.name if isinstance(exc, ImportError) else None
    if not module:
        return text
    top = module.partition(".")[0]
    if top in ENGINE_PACKAGES:
        hint = "install isobranch with its dask extra on every worker, at the caller's version"
    elif top in by_reference:
        hint = (f"module {top!r} {by_reference[top]}: install it on every worker, or put "
                f"its directory on their PYTHONPATH")
    else:
        hint = f"install module {top!r} on every worker, or put its directory on their PYTHONPATH"
    return f"{text} ({hint})"


def error_type(error: BaseException | None, dead: str | None) -> str:
    """The ``error_type`` of a branch whose task failed with ``error`` (or its worker died)."""
    if dead is not None:
        return ErrorKind.WORKER_DIED
    return type(error).__name__ if error is not None else ErrorKind.DASK_ERROR


def result_or_error(future: Any) -> Any:
    """The future's result, or its error as text (one lost result among several); a
    ``TaskAlreadyClaimed`` as it is (the result died, and its recompute ran nothing)."""
    try:
        return future.result(timeout=FETCH_SECONDS)
    except TaskAlreadyClaimed as exc:
        return exc
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def quietly(function: Any, *args: Any) -> Any:
    """``function(*args)``, or None if it raises: cleanup on a cluster that may be gone,
    whose failure is already reported (logged at DEBUG)."""
    try:
        return function(*args)
    except Exception as exc:
        logger.debug("dask backend: %s failed during cleanup (ignored): %s: %s",
                     getattr(function, "__name__", function), type(exc).__name__, exc)
        return None
