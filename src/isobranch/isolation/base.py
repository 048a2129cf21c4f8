"""The backend contract: the base class every backend subclasses, and its half of one fan-out.

Policies are not a backend's business. The fan-out driver (``fanout_run``)
pulls the branches, bounds how many run at once, owns every deadline,
retry backoff, ``fail_fast`` and cancellation; a backend only starts a
branch somewhere, reports what finished, and kills what it is told to.

A backend (``IsolationBackend``) declares its capabilities as attributes
and opens one ``BackendFanOut`` per fan-out: ``start`` takes branches from
the driver's ``RunSource`` and starts them, ``collect`` reports finished
ones, ``kill`` ends one past its deadline, ``close`` stops what is left.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..branch import BranchGraph, BranchRun, ParallelFlowResult

# What ``collect`` reports: a run and its result.
Finished = tuple["BranchRun", "ParallelFlowResult"]


class RunSource(Protocol):
    """Where a backend takes the branches of a fan-out from (the driver owns it).

    Safe to use from any thread. ``take`` hands out the next run to start,
    or None when there is none now: the tasks ran out, the fan-out is
    stopping, as many runs are out as the driver allows, or the next one is
    a retry whose backoff has not ended (the driver then calls ``start``
    again when it has). ``ready`` says whether ``take`` may give a run now
    (no task is built to tell); ``next_due`` when the soonest retry's
    backoff ends (``time.monotonic()``; None: none waits).
    ``max_concurrency`` is what the fan-out asked for (None: as many as the
    backend runs at once).
    """

    max_concurrency: int | None

    def take(self) -> BranchRun | None: ...

    def ready(self) -> bool: ...

    def next_due(self) -> float | None: ...


class BackendFanOut:
    """One fan-out on a backend, from the backend's side.

    The driver calls ``start``, ``collect``, ``kill`` and ``close`` from the
    one thread that runs the fan-out; ``wake`` and ``interrupt`` come from
    any thread. ``slots`` is how many branches it runs at once (its threads,
    its workers, the cluster's threads). ``takes_from_other_threads``: it
    takes runs from the source in threads of its own, not only in those
    calls (the source then locks).
    """

    slots: int = 1
    takes_from_other_threads: bool = False

    def start(self) -> None:
        """Start what the source gives now (or take it ahead, for a backend that does)."""
        raise NotImplementedError

    def collect(self, timeout: float | None) -> list[Finished]:
        """What finished since the last call: wait for at least one result, for at most
        ``timeout`` seconds (None: no limit), or until ``wake``; may return nothing."""
        raise NotImplementedError

    def wake(self) -> None:
        """End a ``collect`` (or a ``start`` waiting for a worker) at once: something changed."""
        raise NotImplementedError

    def interrupt(self) -> None:
        """The run is being cancelled: as ``wake``, and stop a branch running in the
        driver's own thread (the inline backend's)."""
        self.wake()

    def kill(self, run: BranchRun) -> ParallelFlowResult | None:
        """``run`` is past its deadline: end it and return its timed-out result, with its
        state as of the kill, or its own result if it turns out to have just finished
        (None: ``collect`` reports that result). Only called on a backend that
        ``kills_overdue``."""
        raise NotImplementedError

    def close(self, *, cancelled: bool) -> None:
        """The fan-out is over: stop every branch still held (the fan-out ended early:
        fail_fast, an error, Ctrl-C; ``cancelled``: the run was cancelled) and release
        what this fan-out holds."""


class IsolationBackend:
    """Where the branches of a fan-out run: the base class of every backend.

    Every capability the engine asks a backend about is an attribute
    declared here with its default; a subclass states only how it differs,
    implements ``open`` and, if it holds workers, ``close``. A backend
    written to the first protocol (``run_branches`` or ``stream_branches``,
    subclassing nothing) is wrapped by the registry in an adapter
    (``adapters``).
    """

    #: The name it is registered under (``ParallelFlowResult.isolation``).
    name: str = ""
    #: Branches run in other processes: the state must pickle, and the runner
    #: checks that before a fan-out, naming what does not.
    crosses_processes: bool = False
    #: How many branches it runs at once, when it knows before a fan-out.
    max_workers: int | None = None
    #: Branches it may take beyond those it runs, per slot, when the fan-out
    #: does not bound concurrency more tightly (queued in its threads' queue,
    #: sent ahead to busy workers, waiting at a scheduler), so a slot that
    #: frees up never waits a round trip for its next branch.
    tasks_ahead_per_worker: int = 0
    #: It can end a branch past its deadline from outside (the driver then
    #: calls ``kill`` ``kill_grace_seconds`` after the deadline, time the
    #: branch has to report its own timeout with its state); without it a
    #: branch enforces its deadline itself, at node boundaries and in Lua.
    kills_overdue: bool = False
    kill_grace_seconds: float = 0.25
    #: It is handed ``max_concurrency`` and bounds what it takes itself (a
    #: backend with its own ``stream_branches``): the driver sets no bound.
    bounds_concurrency: bool = False

    def check_branch_max_memory(self, limit: int) -> str | None:
        """Why this backend cannot enforce a ``branch_max_memory`` of ``limit`` bytes
        (None: it can). By default it cannot: its branches share one process's memory."""
        return (f"isolation {self.name!r} cannot enforce a memory limit per branch (its "
                f"branches share one process's memory); it is enforced by isolation "
                f"'process' (each worker process) and 'dask' (each worker of the local "
                f"cluster isobranch starts)")

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """This backend's half of one fan-out of ``graph``, taking its branches from
        ``source``. Nothing may be taken before the driver's first ``start``."""
        raise NotImplementedError(f"backend {self.name!r} does not implement open()")

    def close(self) -> None:
        """Release every worker the backend owns (nothing by default). Safe twice."""

