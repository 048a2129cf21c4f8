"""The process backend: each branch runs in a worker process.

A branch's state copy goes to a worker pickled, runs there with a fresh Lua
VM and the worker's own Python modules, and its ``ParallelFlowResult``
comes back pickled. Workers are forks of a per-pool fork server that loaded
the compiled graph once (see ``launcher``), so the graph crosses once
per pool, never per branch.

The parent is the watchdog. Workers run Lua with no count hook (bare speed)
and report each node and each Lua deadline; when a deadline or
``branch_timeout`` passes, the parent kills the worker, so even one long C
call or a Python ``time.sleep`` ends on time. A worker that dies fails only
its own branch; the pool replaces it on demand.

Branches come from a lazy stream (a map's tasks are built as workers free
up). Once a fan-out's branches are seen to be short, a few small inputs are
sent ahead to each busy worker, which runs them one after another: no
worker waits a round trip for its next branch. If the worker dies or is
killed, only the branch it was running fails; those queued behind it never
started and run on another worker.

The pool is not ``concurrent.futures.ProcessPoolExecutor``: that pool
breaks as a whole when one worker dies, failing every sibling, and cannot
kill one stuck worker. This one tracks each worker separately. Its
workers are ``pool.WorkerPool``, a branch's bookkeeping is ``branches``,
what crosses to a worker and back is ``wire``; what is left here (a little over 400 lines) is the
one wait loop that serves them.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from ...branch import BranchRun, ParallelFlowResult, failed_result
from ...error_kinds import ErrorKind
from ...errors import BackendError, ConfigError
from ..base import BackendFanOut, Finished, IsolationBackend, RunSource
from ..memory_limit import BRANCH_MEMORY_ERROR, memory_message, oom_killed
from ..wakeup import PipeWaker
from . import wire
from .branches import (
    BRANCH_KILL_GRACE_SECONDS,
    NEVER_STARTED,
    SEND_AHEAD_DEPTH,
    SEND_AHEAD_MAX_BYTES,
    LuaCall,
    Pace,
    Queued,
    Running,
    TaskSource,
    WorkerOutcome,
    next_lua_deadline,
)
from .launcher import START_METHODS
from .pool import WorkerPool
from .wire import Kind

if TYPE_CHECKING:
    from ...branch import BranchGraph

logger = logging.getLogger(__name__)

# A fan-out waiting for a worker that another thread's fan-out may release.
POOL_RECHECK_SECONDS = 0.05


class ProcessBackend(IsolationBackend):
    """Runs branches in worker processes owned by this backend.

    ``max_workers`` (default: CPU count) bounds the live workers.
    ``fresh_worker_per_branch=True`` runs every branch in a worker that has
    run nothing else (a fork of the preloaded fork server), so no Python
    module state can pass between branches. ``start_method`` is
    ``"forkserver"`` (default) or ``"spawn"``.
    """

    name = "process"
    # The runner checks this before fan-out: state must pickle to get here.
    crosses_processes = True
    # Short branches are sent ahead to busy workers, this many each at most.
    tasks_ahead_per_worker = SEND_AHEAD_DEPTH
    # The watchdog kills a worker whose branch is past its branch_timeout.
    kills_overdue = True
    kill_grace_seconds = BRANCH_KILL_GRACE_SECONDS

    @staticmethod
    def check_branch_max_memory(limit: int) -> str | None:
        """Any limit can be enforced: it counts what the branch allocates in its worker."""
        return None

    def __init__(self, max_workers: int | None = None, *, fresh_worker_per_branch: bool = False,
                 start_method: str = "forkserver") -> None:
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        if not isinstance(fresh_worker_per_branch, bool):
            raise ConfigError(f"fresh_worker_per_branch must be true or false, "
                              f"got {fresh_worker_per_branch!r}")
        if start_method not in START_METHODS:
            raise ConfigError(f"start_method must be one of {', '.join(START_METHODS)}, "
                              f"got {start_method!r}")
        self.max_workers = max_workers or os.cpu_count() or 1
        self.fresh_worker_per_branch = fresh_worker_per_branch
        self.start_method = start_method
        self.pool = WorkerPool(self.max_workers, fresh=fresh_worker_per_branch,
                               start_method=start_method)
        # Wakers (and their pollers) of fan-outs that ended, for the next ones: a
        # fan-out would otherwise pay a pipe and a poll object of its own.
        self._spare_wakers: list[tuple[PipeWaker, _Readiness]] = []
        self._spare_lock = threading.Lock()

    def waker(self) -> tuple[PipeWaker, _Readiness]:
        """A waker and a poller watching it, for one fan-out."""
        with self._spare_lock:
            if self._spare_wakers:
                return self._spare_wakers.pop()
        waker = PipeWaker()
        return waker, _Readiness(waker.fd)

    def keep_waker(self, waker: PipeWaker, ready: _Readiness) -> None:
        """A fan-out ended: its waker serves the next one (closed if the backend is)."""
        waker.clear()
        with self._spare_lock:
            if not self.pool.closed:
                self._spare_wakers.append((waker, ready))
                return
        waker.close()

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """Workers for one fan-out of ``graph`` (its pool is started, or replaced, now)."""
        self.pool.ensure_launcher(graph)
        return _ProcessFanOut(self, source)

    def close(self) -> None:
        """Stop every worker and the fork server; nothing is left behind. Safe twice."""
        self.pool.close()
        with self._spare_lock:
            spare, self._spare_wakers = self._spare_wakers, []
        for waker, _ in spare:
            waker.close()

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of this pool's fork server, if one is running."""
        return self.pool.fork_server_pid


class _ProcessFanOut(BackendFanOut):
    """One fan-out on the process backend: its branches in workers, and their watchdog.

    A branch is taken from the driver (and pickled) when a worker is free
    for it, or, once branches are seen to be short, to be sent ahead to a
    busy worker (at most ``SEND_AHEAD_DEPTH`` each), which runs them one
    after another. ``collect`` waits on the workers' connections; the Lua
    deadlines workers report are enforced here, a branch's own deadline by
    the driver through ``kill``. ``close`` kills the workers of unfinished
    branches; the pool replaces them on demand.
    """

    def __init__(self, backend: ProcessBackend, source: RunSource) -> None:
        self._backend = backend
        self.name = backend.name
        self.slots = backend.max_workers
        self._pool = backend.pool
        self._upcoming = TaskSource(source)
        self._running: dict[Connection, Running] = {}
        # Branches sent ahead to a busy worker, behind the one it runs (short branches only).
        self._backlog: dict[Connection, deque[Queued]] = {}
        self._pace = Pace(enabled=not backend.fresh_worker_per_branch)
        self._waker, self._ready = backend.waker()
        # Set by wake(): a start() waiting for a worker gives up; cleared when collect
        # has seen the wake-up.
        self._woken = False

    def start(self) -> None:
        """Give free workers a branch each, and send short branches ahead to busy ones."""
        self._dispatch()
        self._send_ahead()

    def collect(self, timeout: float | None) -> list[Finished]:
        """Wait for workers to report (or a Lua deadline, or ``wake``); what finished."""
        running = self._running
        lua = next_lua_deadline(running.values())
        if lua is not None:
            timeout = lua if timeout is None else min(timeout, lua)
        if self._upcoming.has_queued and len(running) < self.slots:
            # Waiting for a worker another thread's fan-out may release: look again soon.
            timeout = POOL_RECHECK_SECONDS if timeout is None else min(timeout,
                                                                        POOL_RECHECK_SECONDS)
        self._pool.check_open()
        finished: list[Finished] = []
        ready, woken = self._ready.wait(running, timeout)
        if woken:
            self._waker.clear()
            self._woken = False
        for conn in ready:
            slot = running[conn]
            outcome = self._receive(slot, readable=True)
            if outcome is None:
                continue
            if isinstance(outcome, ParallelFlowResult) and not conn.closed:
                self._pace.observe(outcome)
                self._next_in_worker(conn)
                finished.append((slot.run, outcome))
                continue
            # The worker is gone: what was sent ahead to it never started.
            del running[conn]
            self._upcoming.retry_all(self._backlog.pop(conn, ()))
            if outcome is NEVER_STARTED and not slot.retried:
                # It was already dead while idle: the branch runs on another worker.
                self._upcoming.retry(Queued(slot.run, slot.payload, True))
            elif outcome is NEVER_STARTED:
                finished.append((slot.run, self._crashed(slot)))
            else:
                finished.append((slot.run, outcome))
        finished.extend(self._expire_lua())
        return finished

    def wake(self) -> None:
        """End ``collect``'s wait, or ``start``'s wait for a free worker (from any thread)."""
        self._woken = True
        self._waker.wake()
        with self._pool.lock:
            self._pool.lock.notify_all()

    def kill(self, run: BranchRun) -> ParallelFlowResult:
        """Kill the worker of ``run``, past its ``branch_timeout``; its timed-out result,
        with the state as of its last merged update (or its result, if it was waiting)."""
        slot: Running = run.handle
        conn = slot.worker.conn
        limit = slot.task.limits.branch_timeout or 0.0
        outcome = self._receive(slot)  # its result may be waiting unread
        if isinstance(outcome, ParallelFlowResult):
            if conn.closed:
                self._running.pop(conn, None)
                self._upcoming.retry_all(self._backlog.pop(conn, ()))
            else:
                self._next_in_worker(conn)
            return outcome
        self._running.pop(conn, None)
        self._upcoming.retry_all(self._backlog.pop(conn, ()))
        return self._branch_timed_out(slot, limit)

    def close(self, *, cancelled: bool) -> None:
        """Kill the workers of unfinished branches (the fan-out stopped early: fail_fast,
        Ctrl-C, an error, a cancellation); branches not started never start."""
        running = self._running
        if running:
            logger.debug("process backend: stopping %d unfinished branch(es) early: %s",
                         len(running), ", ".join(repr(s.task.name) for s in running.values()))
        for slot in running.values():
            self._pool.discard(slot.worker, kill=True)
        running.clear()
        self._backend.keep_waker(self._waker, self._ready)

    def _next_in_worker(self, conn: Connection) -> None:
        """The worker of ``conn`` finished a branch: it starts the next one sent ahead, or is free."""
        running, backlog = self._running, self._backlog
        worker = running.pop(conn).worker
        ahead = backlog.get(conn)
        if ahead:
            running[conn] = Running.start(ahead.popleft(), worker)
            return
        backlog.pop(conn, None)
        self._pool.release(worker)

    def _send_ahead(self) -> None:
        """Queue short branches in busy workers so none waits a round trip for its next one.

        Only while branches are seen to be short (a long one waiting behind
        another would idle a free worker), and only small inputs: what waits
        in a worker's socket never blocks the parent.
        """
        running, upcoming = self._running, self._upcoming
        if not self._pace.send_ahead or not running:
            return
        for conn in list(running):
            ahead = self._backlog.setdefault(conn, deque())
            if len(ahead) > SEND_AHEAD_DEPTH // 2:
                continue  # topped up in batches: one write for several branches
            batch: list[Queued] = []
            while len(ahead) + len(batch) < SEND_AHEAD_DEPTH:
                queued = upcoming.peek()
                if queued is None or len(queued.payload) > SEND_AHEAD_MAX_BYTES:
                    break
                batch.append(upcoming.take())
            if not batch:
                return
            try:
                wire.send_frames(conn, [queued.payload for queued in batch])
            except OSError as exc:
                logger.debug("process backend: worker process %s did not take %d branch(es) "
                             "sent ahead (%s); they wait for another worker, and its death is "
                             "reported with the branch it runs", running[conn].worker.pid,
                             len(batch), exc)
                upcoming.retry_all(batch)
                return
            ahead.extend(batch)

    def _dispatch(self) -> None:
        running, upcoming = self._running, self._upcoming
        while upcoming.peek() is not None:
            worker = self._pool.acquire(block=not running, give_up=self._was_woken)
            if worker is None:
                return
            queued = upcoming.take()
            # Tracked first: if anything interrupts the send, close() kills
            # this worker instead of losing its pool place.
            running[worker.conn] = Running.start(queued, worker)
            try:
                worker.conn.send_bytes(queued.payload)
            except OSError as exc:  # it died while idle; the branch has not started
                del running[worker.conn]
                how = self._pool.discard(worker, kill=True)
                logger.warning("process backend: worker process %s %s while idle (%s); "
                               "branch %r runs on another worker", worker.pid, how, exc,
                               queued.run.task.name)
                upcoming.retry(queued)

    def _was_woken(self) -> bool:
        return self._woken

    def _receive(self, slot: Running, readable: bool = False) -> WorkerOutcome:
        """Read what a worker said: its branch's result, ``NEVER_STARTED`` (it died before
        saying anything), or None if it is still running. ``readable``: a wait just said
        its connection is (no need to ask again before the first read)."""
        task = slot.task
        conn = slot.worker.conn
        try:
            while readable or _has_data(conn):
                readable = False
                data = conn.recv_bytes()
                slot.heard_from = True
                try:
                    message = wire.decode(data)
                except Exception as exc:  # e.g. an exception class that cannot be rebuilt
                    self._pool.discard(slot.worker, kill=True)
                    return self._failed(
                        slot, f"branch {task.name!r}: what its worker sent back cannot "
                        f"be unpickled here: {type(exc).__name__}: {exc}",
                        ErrorKind.STATE_COPY_ERROR, timed_out=False)
                kind = message[0]
                if kind == Kind.NODE:
                    slot.node, slot.lua = message[1], None
                elif kind == Kind.LUA:
                    slot.lua = LuaCall(*message[1:])
                elif kind == Kind.LUA_DONE:
                    slot.lua = None
                elif kind == Kind.MERGED:
                    slot.updates.append(message[2])
                elif kind == Kind.STEP:
                    slot.updates.append(message[2])
                    slot.node, slot.lua = message[3], None
                elif kind == Kind.RESULT:
                    if message[1].error_type == BRANCH_MEMORY_ERROR:
                        # An allocation failed somewhere in it: the worker is not
                        # reused, and what was sent ahead to it runs elsewhere.
                        self._pool.discard(slot.worker, kill=True)
                    return message[1]
        except (EOFError, OSError):
            if self._pool.closed:
                raise BackendError("the process backend was closed while running") from None
            if not slot.heard_from:
                how = self._pool.discard(slot.worker, kill=True)
                logger.warning("process backend: worker process %s %s before it started "
                               "branch %r", slot.worker.pid, how, task.name)
                return NEVER_STARTED
            return self._crashed(slot)
        return None

    def _crashed(self, slot: Running) -> ParallelFlowResult:
        how = self._pool.discard(slot.worker, kill=True)
        where = f" (running node {slot.node!r})" if slot.node else ""
        logger.warning("process backend: worker process %s %s while it ran branch %r%s",
                       slot.worker.pid, how, slot.task.name, where)
        limit = slot.task.limits.branch_max_memory
        if limit is not None and oom_killed(slot.oom_kills, how):
            return self._failed(slot, memory_message(
                slot.task.name, slot.node, limit,
                f"the kernel's out-of-memory killer ended worker process {slot.worker.pid}"),
                BRANCH_MEMORY_ERROR, timed_out=False)
        return self._failed(slot, f"branch {slot.task.name!r}: worker process {slot.worker.pid}"
                                  f"{where} {how}", ErrorKind.WORKER_CRASHED, timed_out=False)

    def _expire_lua(self) -> list[Finished]:
        """Branches whose armed Lua call is past its deadline: their workers are killed.

        A branch that turns out to have just finished is reported with its
        result, and its worker goes on.
        """
        now = time.monotonic()
        expired: list[Finished] = []
        running = self._running
        for conn, slot in list(running.items()):
            if not slot.lua_overdue(now):
                continue
            outcome = self._receive(slot)  # it may have just finished
            if outcome is not None:
                if not isinstance(outcome, ParallelFlowResult):
                    outcome = self._crashed(slot)
                if conn.closed:
                    del running[conn]
                    self._upcoming.retry_all(self._backlog.pop(conn, ()))
                else:
                    self._next_in_worker(conn)
                expired.append((slot.run, outcome))
                continue
            if slot.lua_overdue(now):
                del running[conn]
                self._upcoming.retry_all(self._backlog.pop(conn, ()))
                expired.append((slot.run, self._lua_timed_out(slot)))
        return expired

    def _lua_timed_out(self, slot: Running) -> ParallelFlowResult:
        task = slot.task
        assert slot.lua is not None
        lua = slot.lua
        self._pool.discard(slot.worker, kill=True)
        logger.warning("process backend: the watchdog killed worker process %s: Lua in node %r "
                       "of branch %r ran past its deadline", slot.worker.pid, slot.node,
                       task.name)
        ended = f" (the watchdog ended worker process {slot.worker.pid})"
        if lua.branch_deadline and task.limits.branch_timeout:
            return self._failed(
                slot, f"branch {task.name!r} timed out after "
                f"{task.limits.branch_timeout:g}s in node {slot.node!r}{ended}",
                ErrorKind.BRANCH_TIMEOUT, timed_out=True)
        return self._failed(
            slot, f"node {slot.node!r} in branch {task.name!r} failed: LuaTimeoutError: "
            f"{lua.chunk}: Lua code ran past its {lua.limit:g}s timeout{ended}",
            ErrorKind.LUA_TIMEOUT_ERROR, timed_out=False)

    def _branch_timed_out(self, slot: Running, limit: float) -> ParallelFlowResult:
        self._pool.discard(slot.worker, kill=True)
        logger.warning("process backend: the watchdog killed worker process %s: branch %r ran "
                       "past its %gs branch_timeout", slot.worker.pid, slot.task.name, limit)
        where = f" in node {slot.node!r}" if slot.node else ""
        return self._failed(slot, f"branch {slot.task.name!r} timed out after {limit:g}s{where} "
                                        f"(the watchdog killed worker process {slot.worker.pid})",
                            ErrorKind.BRANCH_TIMEOUT, timed_out=True)

    def _failed(self, slot: Running, error: str, error_type: str, *,
                timed_out: bool) -> ParallelFlowResult:
        return failed_result(
            slot.task, error, error_type, state=slot.state_as_of_now(), timed_out=timed_out,
            duration_ms=(time.monotonic() - slot.started) * 1000.0, isolation=self.name,
            worker=slot.worker.pid, node=slot.node)


def _has_data(conn: Connection) -> bool:
    """Whether reading ``conn`` would not block (a message, or the end of a dead worker);
    ``conn.poll()`` asks the same through a selector made for each call."""
    return bool(select.select((conn.fileno(),), (), (), 0)[0])


class _Readiness:
    """Which workers of a fan-out have something to say, and whether it was woken.

    One ``select.poll`` object watches the waker and the running workers'
    connections across waits; only connections that started or stopped
    running since the last wait are registered or forgotten (a closed
    connection's descriptor number may be reused by a new one).
    """

    def __init__(self, waker_fd: int) -> None:
        self._poll = select.poll()
        self._waker_fd = waker_fd
        self._poll.register(waker_fd, select.POLLIN)
        self._watched: dict[int, Connection] = {}

    def wait(self, running: dict[Connection, Running], timeout: float | None
             ) -> tuple[list[Connection], bool]:
        """The running connections that are readable (or hung up) within ``timeout`` seconds,
        and whether the waker was woken."""
        watched, poll = self._watched, self._poll
        if len(watched) != len(running) or any(conn not in running for conn in watched.values()):
            for fd in [fd for fd, conn in watched.items() if conn not in running]:
                poll.unregister(fd)
                del watched[fd]
            for conn in running:
                fd = conn.fileno()
                if watched.get(fd) is not conn:
                    if fd in watched:
                        poll.unregister(fd)
                    poll.register(fd, select.POLLIN)
                    watched[fd] = conn
        events = poll.poll(None if timeout is None else math.ceil(timeout * 1000))
        woken = False
        ready = []
        for fd, _ in events:
            if fd == self._waker_fd:
                woken = True
            else:
                ready.append(watched[fd])
        return ready, woken
