"""The process backend: each branch runs in a worker process.

A branch's state copy goes to a worker pickled, runs there with a fresh Lua
VM and the worker's own Python modules, and its ``ParallelFlowResult``
comes back pickled. Workers are forks of a per-pool fork server that loaded
the compiled graph once (see ``process_pool``), so the graph crosses once
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
workers are ``process_workers.WorkerPool``, a branch's bookkeeping is
``process_branches``; what is left here (a little over 400 lines) is the
one wait loop that serves them.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

from ..branch import BranchTask, ParallelFlowResult
from ..cancellation import CancelSignal
from ..error_kinds import ErrorKind
from ..errors import BackendError, ConfigError
from ..fanout import run_in_order
from .base import register_backend, set_waker
from .memory_limit import BRANCH_MEMORY_ERROR, memory_message, oom_killed
from .process_branches import (
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
    next_wakeup,
    send_frames,
)
from .process_pool import START_METHODS
from .process_worker import LUA, LUA_DONE, MERGED, NODE, RESULT, STEP
from .process_workers import WorkerPool
from .wakeup import PipeWaker

logger = logging.getLogger(__name__)

# A fan-out waiting for a worker that another thread's fan-out may release.
POOL_RECHECK_SECONDS = 0.05


class ProcessBackend:
    """Runs branches in worker processes owned by this backend.

    ``max_workers`` (default: CPU count) bounds the live workers.
    ``fresh_worker_per_branch=True`` runs every branch in a worker that has
    run nothing else (a fork of the preloaded fork server), so no Python
    module state can pass between branches. ``start_method`` is
    ``"forkserver"`` (default) or ``"spawn"``.
    """

    name = "process"
    cancellable = True
    # The runner checks this before fan-out: state must pickle to get here.
    crosses_processes = True
    # Its tasks may answer NotReady (a retry waiting); running branches go on.
    accepts_not_ready = True

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
        self._pool = WorkerPool(self.max_workers, fresh=fresh_worker_per_branch,
                                start_method=start_method)

    # -- public -------------------------------------------------------------

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` in workers, yielding ``(position, result)`` as each finishes.

        At most ``max_concurrency`` (default: ``max_workers``) run at once.
        A task is taken from ``tasks`` (and pickled) when a worker is free
        for it, or, once branches are seen to be short, to be sent ahead to
        a busy worker (at most ``SEND_AHEAD_DEPTH`` each). Closing the
        generator kills the workers of unfinished branches; the pool
        replaces them on demand. A set ``cancel`` wakes the wait, does the
        same and raises ``RunCancelled``.
        """
        limit = max_concurrency or self.max_workers
        source = TaskSource(tasks)
        first = source.peek()
        if first is None:
            return
        pool = self._pool
        pool.ensure_launcher(first.task.graph)
        running: dict[Connection, Running] = {}
        # Branches sent ahead to a busy worker, behind the one it runs (short branches only).
        backlog: dict[Connection, deque[Queued]] = {}
        pace = Pace(enabled=not self.fresh_worker_per_branch)
        wakeup = PipeWaker(cancel, pool.lock) if cancel is not None else None
        # Only a source that may answer NotReady can need waking.
        waker = PipeWaker() if callable(getattr(tasks, "set_waker", None)) else None
        if waker is not None:
            set_waker(tasks, waker.wake)
        try:
            while source.peek() is not None or running or source.waiting:
                if cancel is not None:
                    cancel.raise_if_set()
                self._dispatch(source, running, limit, cancel)
                self._send_ahead(source, running, backlog, pace)
                timeout = next_wakeup(running.values())
                if source.peek() is not None and len(running) < limit:
                    # Waiting for a worker another thread may free: look again soon.
                    timeout = min(timeout if timeout is not None else POOL_RECHECK_SECONDS,
                                  POOL_RECHECK_SECONDS)
                elif source.waiting and source.wake_at is not None:
                    # A retry is due then; a result or the waker may come first.
                    due = max(source.wake_at - time.monotonic(), 0.0)
                    timeout = due if timeout is None else min(timeout, due)
                pool.check_open()
                finished: list[tuple[int, ParallelFlowResult]] = []
                watched: list[Any] = [*running]
                watched += [w for w in (wakeup, waker.fd if waker else None) if w is not None]
                ready = wait(watched, timeout=timeout)
                if cancel is not None:
                    cancel.raise_if_set()
                for conn in ready:
                    if waker is not None and conn == waker.fd:
                        waker.clear()  # the task source changed (a retry was stopped)
                        continue
                    slot = running[conn]
                    outcome = self._receive(slot)
                    if outcome is None:
                        continue
                    if isinstance(outcome, ParallelFlowResult) and not conn.closed:
                        pace.observe(outcome)
                        self._next_in_worker(conn, running, backlog)
                        finished.append((slot.position, outcome))
                        continue
                    # The worker is gone: what was sent ahead to it never started.
                    del running[conn]
                    source.retry_all(backlog.pop(conn, ()))
                    if outcome is NEVER_STARTED and not slot.retried:
                        # It was already dead while idle: the branch runs on another worker.
                        source.retry(Queued(slot.position, slot.task, slot.payload, True))
                    elif outcome is NEVER_STARTED:
                        finished.append((slot.position, self._crashed(slot)))
                    else:
                        finished.append((slot.position, outcome))
                for conn, position, result, worker_lost in self._expire(running):
                    if worker_lost:
                        source.retry_all(backlog.pop(conn, ()))
                    else:
                        self._next_in_worker(conn, running, backlog)
                    finished.append((position, result))
                yield from finished
        finally:
            # Stopped early (fail_fast, Ctrl-C, a consumer gone) or failed:
            # unfinished branches' workers are killed; queued tasks never start.
            if running:
                logger.debug("process backend: stopping %d unfinished branch(es) early: %s",
                             len(running), ", ".join(repr(s.task.label) for s in running.values()))
            for slot in running.values():
                pool.discard(slot.worker, kill=True)
            if wakeup is not None:
                wakeup.close()
            if waker is not None:
                waker.close()

    def _next_in_worker(self, conn: Connection, running: dict[Connection, Running],
                        backlog: dict[Connection, deque[Queued]]) -> None:
        """The worker of ``conn`` finished a branch: it starts the next one sent ahead, or is free."""
        worker = running.pop(conn).worker
        ahead = backlog.get(conn)
        if ahead:
            running[conn] = Running.start(ahead.popleft(), worker)
            return
        backlog.pop(conn, None)
        self._pool.release(worker)

    def _send_ahead(self, source: TaskSource, running: dict[Connection, Running],
                    backlog: dict[Connection, deque[Queued]], pace: Pace) -> None:
        """Queue short branches in busy workers so none waits a round trip for its next one.

        Only while branches are seen to be short (a long one waiting behind
        another would idle a free worker), and only small inputs: what waits
        in a worker's socket never blocks the parent.
        """
        if not pace.send_ahead or not running:
            return
        for conn in list(running):
            ahead = backlog.setdefault(conn, deque())
            if len(ahead) > SEND_AHEAD_DEPTH // 2:
                continue  # topped up in batches: one write for several branches
            batch: list[Queued] = []
            while len(ahead) + len(batch) < SEND_AHEAD_DEPTH:
                queued = source.peek()
                if queued is None or len(queued.payload) > SEND_AHEAD_MAX_BYTES:
                    break
                batch.append(source.take())
            if not batch:
                return
            try:
                send_frames(conn, [queued.payload for queued in batch])
            except OSError as exc:
                logger.debug("process backend: worker process %s did not take %d branch(es) "
                             "sent ahead (%s); they wait for another worker, and its death is "
                             "reported with the branch it runs", running[conn].worker.pid,
                             len(batch), exc)
                source.retry_all(batch)
                return
            ahead.extend(batch)

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in workers and return their results in task order."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def close(self) -> None:
        """Stop every worker and the fork server; nothing is left behind. Safe twice."""
        self._pool.close()

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of this pool's fork server, if one is running."""
        return self._pool.fork_server_pid

    # -- one fan-out ------------------------------------------------------------

    def _dispatch(self, source: TaskSource, running: dict[Connection, Running], limit: int,
                  cancel: CancelSignal | None = None) -> None:
        while len(running) < limit and source.peek() is not None:
            worker = self._pool.acquire(block=not running, cancel=cancel)
            if worker is None:
                return
            queued = source.take()
            # Tracked first: if anything interrupts the send, the caller's
            # cleanup kills this worker instead of losing its pool place.
            running[worker.conn] = Running.start(queued, worker)
            try:
                worker.conn.send_bytes(queued.payload)
            except OSError as exc:  # it died while idle; the branch has not started
                del running[worker.conn]
                how = self._pool.discard(worker, kill=True)
                logger.warning("process backend: worker process %s %s while idle (%s); "
                               "branch %r runs on another worker", worker.pid, how, exc,
                               queued.task.label)
                source.retry(queued)

    def _receive(self, slot: Running) -> WorkerOutcome:
        """Read what a worker said: its branch's result, ``NEVER_STARTED`` (it died before
        saying anything), or None if it is still running."""
        task = slot.task
        conn = slot.worker.conn
        try:
            while conn.poll():
                data = conn.recv_bytes()
                slot.heard_from = True
                try:
                    message = pickle.loads(data)
                except Exception as exc:  # e.g. an exception class that cannot be rebuilt
                    self._pool.discard(slot.worker, kill=True)
                    return self._failed(
                        slot, f"branch {task.label!r}: what its worker sent back cannot "
                        f"be unpickled here: {type(exc).__name__}: {exc}",
                        ErrorKind.STATE_COPY_ERROR, timed_out=False)
                kind = message[0]
                if kind == NODE:
                    slot.node, slot.lua = message[1], None
                elif kind == LUA:
                    slot.lua = LuaCall(*message[1:])
                elif kind == LUA_DONE:
                    slot.lua = None
                elif kind == MERGED:
                    slot.updates.append(message[2])
                elif kind == STEP:
                    slot.updates.append(message[2])
                    slot.node, slot.lua = message[3], None
                elif kind == RESULT:
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
                               "branch %r", slot.worker.pid, how, task.label)
                return NEVER_STARTED
            return self._crashed(slot)
        return None

    def _crashed(self, slot: Running) -> ParallelFlowResult:
        how = self._pool.discard(slot.worker, kill=True)
        where = f" (running node {slot.node!r})" if slot.node else ""
        logger.warning("process backend: worker process %s %s while it ran branch %r%s",
                       slot.worker.pid, how, slot.task.label, where)
        limit = slot.task.limits.branch_max_memory
        if limit is not None and oom_killed(slot.oom_kills, how):
            return self._failed(slot, memory_message(
                slot.task.label, slot.node, limit,
                f"the kernel's out-of-memory killer ended worker process {slot.worker.pid}"),
                BRANCH_MEMORY_ERROR, timed_out=False)
        return self._failed(slot, f"branch {slot.task.label!r}: worker process {slot.worker.pid}"
                                  f"{where} {how}", ErrorKind.WORKER_CRASHED, timed_out=False)

    def _expire(self, running: dict[Connection, Running]
                ) -> list[tuple[Connection, int, ParallelFlowResult, bool]]:
        """Branches past a deadline: ``(conn, position, result, worker lost)``.

        A branch that turns out to have just finished is reported with its
        result and its worker kept (still in ``running``); any other is
        removed from ``running`` and its worker killed.
        """
        now = time.monotonic()
        expired: list[tuple[Connection, int, ParallelFlowResult, bool]] = []
        for conn, slot in list(running.items()):
            if slot.lua_overdue(now):
                outcome = self._receive(slot)  # it may have just finished
                if outcome is not None:
                    del running[conn]
                    if not isinstance(outcome, ParallelFlowResult):
                        outcome = self._crashed(slot)
                    elif not conn.closed:
                        running[conn] = slot  # it finished: its worker goes on
                    expired.append((conn, slot.position, outcome, conn.closed))
                    continue
                if slot.lua_overdue(now):
                    del running[conn]
                    expired.append((conn, slot.position, self._lua_timed_out(slot), True))
                    continue
            limit = slot.task.limits.branch_timeout
            if limit and now >= slot.started + limit + BRANCH_KILL_GRACE_SECONDS:
                outcome = self._receive(slot)  # its result may be waiting unread
                if isinstance(outcome, ParallelFlowResult):
                    if conn.closed:
                        del running[conn]
                    expired.append((conn, slot.position, outcome, conn.closed))
                    continue
                del running[conn]
                expired.append((conn, slot.position, self._branch_timed_out(slot, limit), True))
        return expired

    def _lua_timed_out(self, slot: Running) -> ParallelFlowResult:
        task = slot.task
        assert slot.lua is not None
        lua = slot.lua
        self._pool.discard(slot.worker, kill=True)
        logger.warning("process backend: the watchdog killed worker process %s: Lua in node %r "
                       "of branch %r ran past its deadline", slot.worker.pid, slot.node,
                       task.label)
        ended = f" (the watchdog ended worker process {slot.worker.pid})"
        if lua.branch_deadline and task.limits.branch_timeout:
            return self._failed(
                slot, f"branch {task.label!r} timed out after "
                f"{task.limits.branch_timeout:g}s in node {slot.node!r}{ended}",
                ErrorKind.BRANCH_TIMEOUT, timed_out=True)
        return self._failed(
            slot, f"node {slot.node!r} in branch {task.label!r} failed: LuaTimeoutError: "
            f"{lua.chunk}: Lua code ran past its {lua.limit:g}s timeout{ended}",
            ErrorKind.LUA_TIMEOUT_ERROR, timed_out=False)

    def _branch_timed_out(self, slot: Running, limit: float) -> ParallelFlowResult:
        self._pool.discard(slot.worker, kill=True)
        logger.warning("process backend: the watchdog killed worker process %s: branch %r ran "
                       "past its %gs branch_timeout", slot.worker.pid, slot.task.label, limit)
        where = f" in node {slot.node!r}" if slot.node else ""
        return self._failed(slot, f"branch {slot.task.label!r} timed out after {limit:g}s{where} "
                                        f"(the watchdog killed worker process {slot.worker.pid})",
                            ErrorKind.BRANCH_TIMEOUT, timed_out=True)

    def _failed(self, slot: Running, error: str, error_type: str, *,
                timed_out: bool) -> ParallelFlowResult:
        task = slot.task
        return ParallelFlowResult(
            branch=task.name, index=task.index, state=slot.state_as_of_now(), success=False,
            error=error,
            error_type=error_type, timed_out=timed_out,
            duration_ms=(time.monotonic() - slot.started) * 1000.0, isolation=self.name,
            worker=slot.worker.pid, node=slot.node)


register_backend("process", ProcessBackend)
