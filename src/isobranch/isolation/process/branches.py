"""The process backend's view of one fan-out's branches: queued, running, and what they said.

``TaskSource`` takes the fan-out's runs from the driver lazily (pickled only
when a worker is free for one, or one is sent ahead) and puts back branches
that never started; ``Running`` is
what the watchdog knows of a branch in a worker (its node, its armed Lua
deadline as a ``LuaCall``, the updates merged so far); ``Pace`` decides when
short branches are sent ahead to busy workers. ``NEVER_STARTED`` is what
reading a worker reports when it died before saying anything.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ...branch import BranchRun, BranchTask, ParallelFlowResult
from ..base import RunSource
from ..memory_limit import kernel_oom_kills
from . import wire
from .launcher import WorkerProcess

logger = logging.getLogger(__name__)

# A branch past its branch_timeout gets this long to report its own timeout
# (with its state) at a node boundary before the driver has its worker killed.
BRANCH_KILL_GRACE_SECONDS = 0.25
# Lua has no hook in a worker; this margin only absorbs message latency.
LUA_KILL_GRACE_SECONDS = 0.02
# Short branches are sent ahead to busy workers, so a worker never waits a
# round trip for its next one: at most this many per worker, each input at
# most this big (a worker's socket buffer holds them without blocking the
# parent), once this many branches in a row took at most this long.
SEND_AHEAD_DEPTH = 8
SEND_AHEAD_MAX_BYTES = 8 * 1024
SEND_AHEAD_AFTER = 4
SEND_AHEAD_BRANCH_MS = 2.0


class NeverStarted:
    """The worker died before it said anything: it never started the branch (it was
    already dead while idle), so the branch may run on another worker."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEVER_STARTED"


NEVER_STARTED = NeverStarted()

# What reading a worker yields: its branch's result, NEVER_STARTED, or None (still running).
WorkerOutcome = ParallelFlowResult | NeverStarted | None


@dataclass(frozen=True, slots=True)
class LuaCall:
    """A Lua call a worker armed the watchdog for: ``deadline`` is ``time.monotonic()``
    time; ``branch_deadline``: the deadline is the branch's own, not the node's Lua limit."""

    chunk: str
    deadline: float
    limit: float | None
    branch_deadline: bool


@dataclass
class Queued:
    """A branch waiting for a worker: its run and its pickled input."""

    run: BranchRun
    payload: bytes
    retried: bool = False

    @property
    def position(self) -> int:
        """The branch's place in the fan-out."""
        return self.run.position


class TaskSource:
    """The runs the driver hands this fan-out, taken only when one can go to a worker
    (and pickled then), with branches whose worker died before they started put back
    in front."""

    def __init__(self, runs: RunSource) -> None:
        self._runs = runs
        self._front: deque[Queued] = deque()

    def peek(self) -> Queued | None:
        """The next branch to start, taking it from the driver if needed; None when there
        is none now."""
        if not self._front:
            run = self._runs.take()
            if run is None:
                return None
            self._front.append(Queued(run, payload(run.task)))
        return self._front[0]

    @property
    def has_queued(self) -> bool:
        """Whether a branch taken from the driver waits here for a worker."""
        return bool(self._front)

    def take(self) -> Queued:
        """Remove and return the branch ``peek`` showed."""
        return self._front.popleft()

    def retry(self, queued: Queued) -> None:
        """Start ``queued`` (whose worker died before it started) again before any other;
        it has not started, as far as its deadline goes."""
        queued.run.started_at = None
        self._front.appendleft(queued)

    def retry_all(self, queued: Iterable[Queued]) -> None:
        """Start every branch of ``queued`` again, in order, before any other."""
        self._front.extendleft(reversed(list(queued)))


class Pace:
    """Whether this fan-out's branches are short enough to be sent ahead to busy workers."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.short_in_a_row = 0

    def observe(self, result: ParallelFlowResult) -> None:
        """Count a finished branch; one long branch stops sending ahead until short ones return."""
        if result.duration_ms <= SEND_AHEAD_BRANCH_MS:
            self.short_in_a_row += 1
        else:
            self.short_in_a_row = 0

    @property
    def send_ahead(self) -> bool:
        """True once enough branches in a row were short."""
        return self.enabled and self.short_in_a_row >= SEND_AHEAD_AFTER


@dataclass
class Running:
    """A branch running in a worker, as the watchdog sees it."""

    run: BranchRun
    payload: bytes
    worker: WorkerProcess
    started: float
    node: str | None = None
    lua: LuaCall | None = None
    updates: list[bytes | None] = field(default_factory=list)
    heard_from: bool = False
    retried: bool = False
    # The kernel's OOM-kill count when the branch started (with branch_max_memory).
    oom_kills: int | None = None

    @classmethod
    def start(cls, queued: Queued, worker: WorkerProcess) -> Running:
        """``queued`` starts now in ``worker`` (the driver's deadline counts from now)."""
        run = queued.run
        run.started_at = started = time.monotonic()
        slot = cls(run, queued.payload, worker, started, retried=queued.retried,
                   oom_kills=oom_kills(run.task))
        run.handle = slot
        return slot

    @property
    def task(self) -> BranchTask:
        """The branch's task."""
        return self.run.task

    def state_as_of_now(self) -> dict:
        """The branch's state when its worker ended: its input plus every merged update."""
        state = self.task.initial_state()
        for update in self.updates:
            if update is not None:
                try:
                    state.update(wire.decode_update(update))
                except Exception as exc:
                    # Left out: the failure report goes on with the state it can rebuild.
                    logger.debug("branch %r: an update its worker sent cannot be unpickled "
                                 "here, left out of its state: %s: %s", self.task.name,
                                 type(exc).__name__, exc)
        return state

    def lua_overdue(self, now: float) -> bool:
        """Whether the armed Lua call ran past its deadline (and the grace)."""
        return self.lua is not None and now >= self.lua.deadline + LUA_KILL_GRACE_SECONDS


def next_lua_deadline(running: Iterable[Running]) -> float | None:
    """Seconds until the watchdog must look at an armed Lua call again (None: none armed)."""
    deadlines = [slot.lua.deadline + LUA_KILL_GRACE_SECONDS for slot in running
                 if slot.lua is not None]
    if not deadlines:
        return None
    return max(min(deadlines) - time.monotonic(), 0.0)


def payload(task: BranchTask) -> bytes:
    """The ``run`` message of ``task`` for a worker."""
    return wire.run_message(task.payload())


def oom_kills(task: BranchTask) -> int | None:
    """The kernel's OOM-kill count now, for a branch with a memory limit (None without)."""
    return kernel_oom_kills() if task.limits.branch_max_memory else None
