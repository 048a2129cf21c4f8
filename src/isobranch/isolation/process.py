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

The pool is not ``concurrent.futures.ProcessPoolExecutor``: that pool
breaks as a whole when one worker dies, failing every sibling, and cannot
kill one stuck worker. This one tracks each worker separately.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..branch import BranchTask, ParallelFlowResult, cancelled_result
from .base import register_backend
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


@dataclass
class _Running:
    """A branch running in a worker, as the watchdog sees it."""

    index: int
    worker: WorkerProcess
    started: float
    node: str | None = None
    lua: tuple[str, float, float | None, bool] | None = None  # chunk, deadline, limit, cut
    updates: list[bytes | None] = field(default_factory=list)
    heard_from: bool = False
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
    # The runner checks this before fan-out: state must pickle to get here.
    crosses_processes = True

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

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in workers and return their results in task order."""
        if not tasks:
            return []
        self._ensure_launcher(tasks[0].graph)
        payloads = [_payload(task) for task in tasks]
        results: list[ParallelFlowResult | None] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        retried: set[int] = set()
        running: dict[Connection, _Running] = {}
        fail_fast = tasks[0].limits.fail_fast
        oom_kills = kernel_oom_kills() if tasks[0].limits.branch_max_memory else None
        try:
            while queue or running:
                self._dispatch(queue, running, payloads, oom_kills)
                timeout = _next_wakeup(running, tasks)
                if queue:
                    # Waiting for a worker another thread may free: look again soon.
                    timeout = min(timeout if timeout is not None else POOL_RECHECK_SECONDS,
                                  POOL_RECHECK_SECONDS)
                with self._lock:
                    if self._closed:
                        raise BackendError("the process backend was closed while running")
                ready = wait(list(running), timeout=timeout)
                for conn in ready:
                    slot = running[conn]
                    outcome = self._receive(slot, tasks[slot.index])
                    if outcome is None:
                        continue
                    del running[conn]
                    if outcome == "retry" and slot.index not in retried:
                        # The worker died before it said anything: it never
                        # started the branch (it was already dead when idle).
                        retried.add(slot.index)
                        queue.appendleft(slot.index)
                    elif outcome == "retry":
                        results[slot.index] = self._crashed(tasks[slot.index], slot)
                    else:
                        results[slot.index] = outcome
                self._expire(running, tasks, results)
                failure = next((r for r in results if r is not None and not r.success), None)
                if fail_fast and failure is not None:
                    self._cancel(queue, running, tasks, results, failure)
        finally:
            for slot in running.values():  # only after an exception (KeyboardInterrupt, say)
                self._discard(slot.worker, kill=True)
        return [r for r in results if r is not None]

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

    def _acquire(self, block: bool) -> WorkerProcess | None:
        """An idle worker, a new one if the pool has room, or None (``block``: wait)."""
        with self._lock:
            while True:
                if self._closed:
                    raise BackendError("the process backend was closed while running")
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

    def _dispatch(self, queue: deque[int], running: dict[Connection, _Running],
                  payloads: list[bytes], oom_kills: int | None = None) -> None:
        while queue:
            worker = self._acquire(block=not running)
            if worker is None:
                return
            index = queue.popleft()
            # Tracked first: if anything interrupts the send, the caller's
            # cleanup kills this worker instead of losing its pool place.
            running[worker.conn] = _Running(index, worker, time.monotonic(), oom_kills=oom_kills)
            try:
                worker.conn.send_bytes(payloads[index])
            except OSError:  # it died while idle; the branch has not started
                del running[worker.conn]
                self._discard(worker, kill=True)
                queue.appendleft(index)

    def _receive(self, slot: _Running, task: BranchTask) -> ParallelFlowResult | str | None:
        """Read what a worker said; a result, "retry", or None if it is still running."""
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
                        task, slot, f"branch {task.label!r}: what its worker sent back cannot "
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
                elif kind == "result":
                    if message[1].error_type == BRANCH_MEMORY_ERROR:
                        # An allocation failed somewhere in it: not reused.
                        self._discard(slot.worker, kill=True)
                    else:
                        self._release(slot.worker)
                    return message[1]
        except (EOFError, OSError):
            with self._lock:
                if self._closed:
                    raise BackendError("the process backend was closed while running") from None
            if not slot.heard_from:
                self._discard(slot.worker, kill=True)
                return "retry"
            return self._crashed(task, slot)
        return None

    def _crashed(self, task: BranchTask, slot: _Running) -> ParallelFlowResult:
        how = self._discard(slot.worker, kill=True)
        where = f" (running node {slot.node!r})" if slot.node else ""
        if oom_killed(slot.oom_kills, how):
            assert task.limits.branch_max_memory is not None
            return self._failed(task, slot, memory_message(
                task.label, slot.node, task.limits.branch_max_memory,
                f"the kernel's out-of-memory killer ended worker process {slot.worker.pid}"),
                BRANCH_MEMORY_ERROR, timed_out=False)
        return self._failed(task, slot, f"branch {task.label!r}: worker process {slot.worker.pid}"
                                        f"{where} {how}", "WorkerCrashed", timed_out=False)

    def _expire(self, running: dict[Connection, _Running], tasks: list[BranchTask],
                results: list[ParallelFlowResult | None]) -> None:
        now = time.monotonic()
        for conn, slot in list(running.items()):
            task = tasks[slot.index]
            if _lua_overdue(slot, now):
                outcome = self._receive(slot, task)  # it may have just finished
                if outcome is not None:
                    del running[conn]
                    results[slot.index] = (outcome if isinstance(outcome, ParallelFlowResult)
                                           else self._crashed(task, slot))
                    continue
                if _lua_overdue(slot, now):
                    del running[conn]
                    results[slot.index] = self._lua_timed_out(task, slot)
                    continue
            limit = task.limits.branch_timeout
            if limit and now >= slot.started + limit + BRANCH_KILL_GRACE_SECONDS:
                del running[conn]
                outcome = self._receive(slot, task)  # its result may be waiting unread
                if isinstance(outcome, ParallelFlowResult):
                    results[slot.index] = outcome
                else:
                    results[slot.index] = self._branch_timed_out(task, slot, limit)

    def _lua_timed_out(self, task: BranchTask, slot: _Running) -> ParallelFlowResult:
        assert slot.lua is not None
        chunk, _deadline, limit, branch_deadline = slot.lua
        self._discard(slot.worker, kill=True)
        ended = f" (the watchdog ended worker process {slot.worker.pid})"
        if branch_deadline and task.limits.branch_timeout:
            return self._failed(
                task, slot, f"branch {task.label!r} timed out after "
                f"{task.limits.branch_timeout:g}s in node {slot.node!r}{ended}",
                "BranchTimeout", timed_out=True)
        return self._failed(
            task, slot, f"node {slot.node!r} in branch {task.label!r} failed: LuaTimeoutError: "
            f"{chunk}: Lua code ran past its {limit:g}s timeout{ended}", "LuaTimeoutError",
            timed_out=False)

    def _branch_timed_out(self, task: BranchTask, slot: _Running,
                          limit: float) -> ParallelFlowResult:
        self._discard(slot.worker, kill=True)
        where = f" in node {slot.node!r}" if slot.node else ""
        return self._failed(task, slot, f"branch {task.label!r} timed out after {limit:g}s{where} "
                                        f"(the watchdog killed worker process {slot.worker.pid})",
                            "BranchTimeout", timed_out=True)

    def _failed(self, task: BranchTask, slot: _Running, error: str, error_type: str, *,
                timed_out: bool) -> ParallelFlowResult:
        return ParallelFlowResult(
            branch=task.branch, state=_state_as_of(task, slot), success=False, error=error,
            error_type=error_type, timed_out=timed_out,
            duration_ms=(time.monotonic() - slot.started) * 1000.0, isolation=self.name,
            worker=slot.worker.pid, node=slot.node)

    def _cancel(self, queue: deque[int], running: dict[Connection, _Running],
                tasks: list[BranchTask], results: list[ParallelFlowResult | None],
                failure: ParallelFlowResult) -> None:
        reason = f"cancelled: branch {failure.branch!r} failed first (fail_fast)"
        for slot in running.values():
            self._discard(slot.worker, kill=True)
            results[slot.index] = cancelled_result(tasks[slot.index], reason)
        running.clear()
        while queue:
            index = queue.popleft()
            results[index] = cancelled_result(tasks[index], reason)


def _payload(task: BranchTask) -> bytes:
    return pickle.dumps(("run", {"branch": task.branch, "fan_in": task.fan_in,
                                 "snapshot": task.snapshot, "limits": task.limits,
                                 "isolation": task.isolation, "path": task.path}),
                        protocol=pickle.HIGHEST_PROTOCOL)


def _state_as_of(task: BranchTask, slot: _Running) -> dict:
    """The branch's state when its worker ended: its input plus every merged update."""
    state = task.snapshot.copy()
    for update in slot.updates:
        if update is not None:
            try:
                state.update(pickle.loads(update))
            except Exception:
                continue  # an update that cannot be rebuilt here is left out
    return state


def _lua_overdue(slot: _Running, now: float) -> bool:
    return slot.lua is not None and now >= slot.lua[1] + LUA_KILL_GRACE_SECONDS


def _next_wakeup(running: dict[Connection, _Running], tasks: list[BranchTask]) -> float | None:
    deadlines = []
    for slot in running.values():
        if slot.lua is not None:
            deadlines.append(slot.lua[1] + LUA_KILL_GRACE_SECONDS)
        limit = tasks[slot.index].limits.branch_timeout
        if limit:
            deadlines.append(slot.started + limit + BRANCH_KILL_GRACE_SECONDS)
    if not deadlines:
        return None
    return max(min(deadlines) - time.monotonic(), 0.0)


register_backend("process", ProcessBackend)
