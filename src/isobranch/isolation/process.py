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
kill one stuck worker. This one tracks each worker separately.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..branch import BranchTask, ParallelFlowResult
from ..cancellation import CancelPipe, CancelSignal
from .base import NotReady, PipeWaker, register_backend, run_in_order, set_waker
from .memory_limit import BRANCH_MEMORY_ERROR, kernel_oom_kills, memory_message, oom_killed
from .process_pool import START_METHODS, WorkerProcess, WorkerStartError, start_launcher
from .shipping import BackendError, pickle_graph

# A branch past its branch_timeout gets this long to report its own timeout
# (with its state) at a node boundary before the watchdog kills its worker.
BRANCH_KILL_GRACE_SECONDS = 0.25
# Lua has no hook in a worker; this margin only absorbs message latency.
LUA_KILL_GRACE_SECONDS = 0.02
# A fan-out waiting for a worker that another thread's fan-out may release.
POOL_RECHECK_SECONDS = 0.05
# Short branches are sent ahead to busy workers, so a worker never waits a
# round trip for its next one: at most this many per worker, each input at
# most this big (a worker's socket buffer holds them without blocking the
# parent), once this many branches in a row took at most this long.
SEND_AHEAD_DEPTH = 8
SEND_AHEAD_MAX_BYTES = 8 * 1024
SEND_AHEAD_AFTER = 4
SEND_AHEAD_BRANCH_MS = 2.0


@dataclass
class _Queued:
    """A branch waiting for a worker: its position in the fan-out and its pickled input."""

    position: int
    task: BranchTask
    payload: bytes
    retried: bool = False


class _Source:
    """The fan-out's tasks, taken lazily (pickled only when a worker is free for one),
    with branches whose worker died before they started put back in front."""

    def __init__(self, tasks: Iterable[BranchTask]) -> None:
        self._tasks = iter(tasks)
        self._position = 0
        self._front: deque[_Queued] = deque()
        self._exhausted = False
        # The tasks answered NotReady: when to ask again (None: after a result).
        self.waiting = False
        self.wake_at: float | None = None

    def peek(self) -> _Queued | None:
        """The next branch to start, building it if needed; None when there is none now."""
        if not self._front and not self._exhausted:
            task = next(self._tasks, None)
            self.waiting = isinstance(task, NotReady)
            if task is None:
                self._exhausted = True
            elif isinstance(task, NotReady):
                self.wake_at = task.wake_at
            else:
                self._front.append(_Queued(self._position, task, _payload(task)))
                self._position += 1
        return self._front[0] if self._front else None

    def take(self) -> _Queued:
        """Remove and return the branch ``peek`` showed."""
        return self._front.popleft()

    def retry(self, queued: _Queued) -> None:
        """Start ``queued`` again before any other."""
        self._front.appendleft(queued)

    def retry_all(self, queued: Iterable[_Queued]) -> None:
        """Start every branch of ``queued`` again, in order, before any other."""
        self._front.extendleft(reversed(list(queued)))


class _Pace:
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
class _Running:
    """A branch running in a worker, as the watchdog sees it."""

    position: int
    task: BranchTask
    payload: bytes
    worker: WorkerProcess
    started: float
    node: str | None = None
    lua: tuple[str, float, float | None, bool] | None = None  # chunk, deadline, limit, cut
    updates: list[bytes | None] = field(default_factory=list)
    heard_from: bool = False
    retried: bool = False
    # The kernel's OOM-kill count when the branch started (with branch_max_memory).
    oom_kills: int | None = None


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
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if not isinstance(fresh_worker_per_branch, bool):
            raise ValueError(f"fresh_worker_per_branch must be true or false, "
                             f"got {fresh_worker_per_branch!r}")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {', '.join(START_METHODS)}, "
                             f"got {start_method!r}")
        self.max_workers = max_workers or os.cpu_count() or 1
        self.fresh_worker_per_branch = fresh_worker_per_branch
        self.start_method = start_method
        self._lock = threading.Condition()
        self._starting_pool = threading.Lock()
        self._launcher: Any = None
        self._graph: weakref.ref | None = None
        self._idle: list[WorkerProcess] = []
        self._workers: set[WorkerProcess] = set()
        self._starting = 0
        self._closed = False

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
        source = _Source(tasks)
        first = source.peek()
        if first is None:
            return
        self._ensure_launcher(first.task.graph)
        running: dict[Connection, _Running] = {}
        # Branches sent ahead to a busy worker, behind the one it runs (short branches only).
        backlog: dict[Connection, deque[_Queued]] = {}
        pace = _Pace(enabled=not self.fresh_worker_per_branch)
        wakeup = CancelPipe(cancel, self._lock) if cancel is not None else None
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
                timeout = _next_wakeup(running)
                if source.peek() is not None and len(running) < limit:
                    # Waiting for a worker another thread may free: look again soon.
                    timeout = min(timeout if timeout is not None else POOL_RECHECK_SECONDS,
                                  POOL_RECHECK_SECONDS)
                elif source.waiting and source.wake_at is not None:
                    # A retry is due then; a result or the waker may come first.
                    due = max(source.wake_at - time.monotonic(), 0.0)
                    timeout = due if timeout is None else min(timeout, due)
                with self._lock:
                    if self._closed:
                        raise BackendError("the process backend was closed while running")
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
                    if outcome == "retry" and not slot.retried:
                        # The worker died before it said anything: it never
                        # started the branch (it was already dead when idle).
                        source.retry(_Queued(slot.position, slot.task, slot.payload, True))
                    elif outcome == "retry":
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
            for slot in running.values():
                self._discard(slot.worker, kill=True)
            if wakeup is not None:
                wakeup.close()
            if waker is not None:
                waker.close()

    def _next_in_worker(self, conn: Connection, running: dict[Connection, _Running],
                        backlog: dict[Connection, deque[_Queued]]) -> None:
        """The worker of ``conn`` finished a branch: it starts the next one sent ahead, or is free."""
        worker = running.pop(conn).worker
        ahead = backlog.get(conn)
        if ahead:
            queued = ahead.popleft()
            running[conn] = _Running(queued.position, queued.task, queued.payload, worker,
                                     time.monotonic(), retried=queued.retried,
                                     oom_kills=_oom_kills(queued.task))
            return
        backlog.pop(conn, None)
        self._release(worker)

    def _send_ahead(self, source: _Source, running: dict[Connection, _Running],
                    backlog: dict[Connection, deque[_Queued]], pace: _Pace) -> None:
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
            batch: list[_Queued] = []
            while len(ahead) + len(batch) < SEND_AHEAD_DEPTH:
                queued = source.peek()
                if queued is None or len(queued.payload) > SEND_AHEAD_MAX_BYTES:
                    break
                batch.append(source.take())
            if not batch:
                return
            try:
                _send_frames(conn, [queued.payload for queued in batch])
            except OSError:  # it died; its reader reports that
                source.retry_all(batch)
                return
            ahead.extend(batch)

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in workers and return their results in task order."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def close(self) -> None:
        """Stop every worker and the fork server; nothing is left behind. Safe twice."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = [w for w in self._workers if w not in idle]
            launcher, self._launcher = self._launcher, None
            self._workers.clear()
            self._lock.notify_all()
        for worker in idle:
            worker.conn.close()  # an idle worker exits when its connection closes
        for worker in busy:
            worker.kill()
        for worker in (*idle, *busy):
            worker.reap()
        if launcher is not None:
            launcher.close()

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of this pool's fork server, if one is running."""
        return getattr(self._launcher, "pid", None)

    # -- workers --------------------------------------------------------------

    def _ensure_launcher(self, graph: Any) -> None:
        # Held while a pool starts, so concurrent first fan-outs start one pool.
        with self._starting_pool:
            with self._lock:
                if self._closed:
                    raise BackendError("the process backend is closed")
                if self._launcher is not None and self._launcher.alive \
                        and self._graph is not None and self._graph() is graph:
                    return
            # A backend serves one compiled graph; another graph (or a fork
            # server that died) gets a new pool.
            graph_bytes = pickle_graph(graph, "worker processes")
            self._retire_pool()
            try:
                launcher = start_launcher(self.start_method, graph_bytes)
            except WorkerStartError as exc:
                raise BackendError(str(exc)) from exc
            with self._lock:
                if self._closed:
                    launcher.close()
                    raise BackendError("the process backend is closed")
                self._launcher, self._graph = launcher, weakref.ref(graph)

    def _retire_pool(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            launcher, self._launcher = self._launcher, None
            for worker in idle:
                self._workers.discard(worker)
        for worker in idle:
            worker.conn.close()
            worker.reap()
        if launcher is not None:
            launcher.close()

    def _acquire(self, block: bool, cancel: CancelSignal | None = None) -> WorkerProcess | None:
        """An idle worker, a new one if the pool has room, or None (``block``: wait)."""
        with self._lock:
            while True:
                if self._closed:
                    raise BackendError("the process backend was closed while running")
                if cancel is not None:
                    cancel.raise_if_set()
                while self._idle:
                    worker = self._idle.pop()
                    if not worker.conn.poll():  # an idle worker only speaks by dying
                        return worker
                    self._workers.discard(worker)
                    self._lock.release()
                    try:
                        worker.reap()
                    finally:
                        self._lock.acquire()
                if len(self._workers) + self._starting < self.max_workers:
                    self._starting += 1
                    launcher = self._launcher
                    break
                if not block:
                    return None
                self._lock.wait()
        worker = None
        try:
            worker = launcher.start_worker(once=self.fresh_worker_per_branch)
        except WorkerStartError as exc:
            raise BackendError(str(exc)) from exc
        finally:
            with self._lock:
                self._starting -= 1
                if worker is not None:
                    self._workers.add(worker)
                self._lock.notify_all()  # a failed start frees its place too
        return worker

    def _release(self, worker: WorkerProcess) -> None:
        if self.fresh_worker_per_branch:
            self._discard(worker, kill=False)
            return
        with self._lock:
            if not self._closed and worker in self._workers:
                self._idle.append(worker)
                self._lock.notify()
                return
        self._discard(worker, kill=True)

    def _discard(self, worker: WorkerProcess, *, kill: bool) -> str:
        if kill:
            worker.kill()
        ending = worker.reap()
        with self._lock:
            self._workers.discard(worker)
            self._lock.notify()
        return ending

    # -- one fan-out ------------------------------------------------------------

    def _dispatch(self, source: _Source, running: dict[Connection, _Running], limit: int,
                  cancel: CancelSignal | None = None) -> None:
        while len(running) < limit and source.peek() is not None:
            worker = self._acquire(block=not running, cancel=cancel)
            if worker is None:
                return
            queued = source.take()
            # Tracked first: if anything interrupts the send, the caller's
            # cleanup kills this worker instead of losing its pool place.
            slot = _Running(queued.position, queued.task, queued.payload, worker,
                            time.monotonic(), retried=queued.retried,
                            oom_kills=_oom_kills(queued.task))
            running[worker.conn] = slot
            try:
                worker.conn.send_bytes(queued.payload)
            except OSError:  # it died while idle; the branch has not started
                del running[worker.conn]
                self._discard(worker, kill=True)
                source.retry(queued)

    def _receive(self, slot: _Running) -> ParallelFlowResult | str | None:
        """Read what a worker said; a result, "retry", or None if it is still running."""
        task = slot.task
        conn = slot.worker.conn
        try:
            while conn.poll():
                data = conn.recv_bytes()
                slot.heard_from = True
                try:
                    message = pickle.loads(data)
                except Exception as exc:  # e.g. an exception class that cannot be rebuilt
                    self._discard(slot.worker, kill=True)
                    return self._failed(
                        slot, f"branch {task.label!r}: what its worker sent back cannot "
                        f"be unpickled here: {type(exc).__name__}: {exc}", "StateCopyError",
                        timed_out=False)
                kind = message[0]
                if kind == "node":
                    slot.node, slot.lua = message[1], None
                elif kind == "lua":
                    slot.lua = message[1:]
                elif kind == "lua_done":
                    slot.lua = None
                elif kind == "merged":
                    slot.updates.append(message[2])
                elif kind == "step":
                    slot.updates.append(message[2])
                    slot.node, slot.lua = message[3], None
                elif kind == "result":
                    if message[1].error_type == BRANCH_MEMORY_ERROR:
                        # An allocation failed somewhere in it: the worker is not
                        # reused, and what was sent ahead to it runs elsewhere.
                        self._discard(slot.worker, kill=True)
                    return message[1]
        except (EOFError, OSError):
            with self._lock:
                if self._closed:
                    raise BackendError("the process backend was closed while running") from None
            if not slot.heard_from:
                self._discard(slot.worker, kill=True)
                return "retry"
            return self._crashed(slot)
        return None

    def _crashed(self, slot: _Running) -> ParallelFlowResult:
        how = self._discard(slot.worker, kill=True)
        where = f" (running node {slot.node!r})" if slot.node else ""
        limit = slot.task.limits.branch_max_memory
        if limit is not None and oom_killed(slot.oom_kills, how):
            return self._failed(slot, memory_message(
                slot.task.label, slot.node, limit,
                f"the kernel's out-of-memory killer ended worker process {slot.worker.pid}"),
                BRANCH_MEMORY_ERROR, timed_out=False)
        return self._failed(slot, f"branch {slot.task.label!r}: worker process {slot.worker.pid}"
                                  f"{where} {how}", "WorkerCrashed", timed_out=False)

    def _expire(self, running: dict[Connection, _Running]
                ) -> list[tuple[Connection, int, ParallelFlowResult, bool]]:
        """Branches past a deadline: ``(conn, position, result, worker lost)``.

        A branch that turns out to have just finished is reported with its
        result and its worker kept (still in ``running``); any other is
        removed from ``running`` and its worker killed.
        """
        now = time.monotonic()
        expired: list[tuple[Connection, int, ParallelFlowResult, bool]] = []
        for conn, slot in list(running.items()):
            if _lua_overdue(slot, now):
                outcome = self._receive(slot)  # it may have just finished
                if outcome is not None:
                    del running[conn]
                    if not isinstance(outcome, ParallelFlowResult):
                        outcome = self._crashed(slot)
                    elif not conn.closed:
                        running[conn] = slot  # it finished: its worker goes on
                    expired.append((conn, slot.position, outcome, conn.closed))
                    continue
                if _lua_overdue(slot, now):
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

    def _lua_timed_out(self, slot: _Running) -> ParallelFlowResult:
        task = slot.task
        assert slot.lua is not None
        chunk, _deadline, limit, branch_deadline = slot.lua
        self._discard(slot.worker, kill=True)
        ended = f" (the watchdog ended worker process {slot.worker.pid})"
        if branch_deadline and task.limits.branch_timeout:
            return self._failed(
                slot, f"branch {task.label!r} timed out after "
                f"{task.limits.branch_timeout:g}s in node {slot.node!r}{ended}",
                "BranchTimeout", timed_out=True)
        return self._failed(
            slot, f"node {slot.node!r} in branch {task.label!r} failed: LuaTimeoutError: "
            f"{chunk}: Lua code ran past its {limit:g}s timeout{ended}", "LuaTimeoutError",
            timed_out=False)

    def _branch_timed_out(self, slot: _Running, limit: float) -> ParallelFlowResult:
        self._discard(slot.worker, kill=True)
        where = f" in node {slot.node!r}" if slot.node else ""
        return self._failed(slot, f"branch {slot.task.label!r} timed out after {limit:g}s{where} "
                                        f"(the watchdog killed worker process {slot.worker.pid})",
                            "BranchTimeout", timed_out=True)

    def _failed(self, slot: _Running, error: str, error_type: str, *,
                timed_out: bool) -> ParallelFlowResult:
        task = slot.task
        return ParallelFlowResult(
            branch=task.name, index=task.index, state=_state_as_of(slot), success=False,
            error=error,
            error_type=error_type, timed_out=timed_out,
            duration_ms=(time.monotonic() - slot.started) * 1000.0, isolation=self.name,
            worker=slot.worker.pid, node=slot.node)


def _send_frames(conn: Connection, messages: list[bytes]) -> None:
    """Send ``messages`` as ``Connection.send_bytes`` would, one after another, in one write.

    The frames are ``multiprocessing.connection``'s (a 4-byte big-endian
    length, then the bytes), so the worker reads them with ``recv_bytes``.
    Only for small messages, which a socket takes without blocking long.
    """
    data = b"".join(_FRAME_HEADER.pack(len(message)) + message for message in messages)
    view = memoryview(data)
    while view:
        view = view[os.write(conn.fileno(), view):]


_FRAME_HEADER = struct.Struct("!i")


def _payload(task: BranchTask) -> bytes:
    return pickle.dumps(("run", task.payload()), protocol=pickle.HIGHEST_PROTOCOL)


def _state_as_of(slot: _Running) -> dict:
    """The branch's state when its worker ended: its input plus every merged update."""
    state = slot.task.initial_state()
    for update in slot.updates:
        if update is not None:
            try:
                state.update(pickle.loads(update))
            except Exception:
                continue  # an update that cannot be rebuilt here is left out
    return state


def _lua_overdue(slot: _Running, now: float) -> bool:
    return slot.lua is not None and now >= slot.lua[1] + LUA_KILL_GRACE_SECONDS


def _next_wakeup(running: dict[Connection, _Running]) -> float | None:
    deadlines = []
    for slot in running.values():
        if slot.lua is not None:
            deadlines.append(slot.lua[1] + LUA_KILL_GRACE_SECONDS)
        limit = slot.task.limits.branch_timeout
        if limit:
            deadlines.append(slot.started + limit + BRANCH_KILL_GRACE_SECONDS)
    if not deadlines:
        return None
    return max(min(deadlines) - time.monotonic(), 0.0)


register_backend("process", ProcessBackend)


def _oom_kills(task: BranchTask) -> int | None:
    """The kernel's OOM-kill count now, for a branch with a memory limit (None without)."""
    return kernel_oom_kills() if task.limits.branch_max_memory else None
