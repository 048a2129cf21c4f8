"""``WorkerPool``: the live worker processes of one process backend.

The pool owns the launcher (a fork server or a spawner, see
``launcher``) for the compiled graph it serves, the workers started
from it, which of them are idle, and how many are starting. Fan-outs on any
thread borrow workers with ``acquire`` and give them back with ``release``
or ``discard``; the pool never lets more than ``max_workers`` live at once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ...errors import BackendError, WorkerStartError
from ..shipping import pickle_graph
from .launcher import WorkerProcess, start_launcher

logger = logging.getLogger(__name__)


class WorkerPool:
    """Workers of one compiled graph, started on demand, reused unless ``fresh``.

    ``fresh`` (``fresh_worker_per_branch``): a worker runs one branch and
    exits. ``lock`` is the condition a fan-out waiting for a free worker
    waits on (a fan-out woken to stop notifies it).
    """

    def __init__(self, max_workers: int, *, fresh: bool, start_method: str) -> None:
        self.max_workers = max_workers
        self.fresh = fresh
        self.start_method = start_method
        self.lock = threading.Condition()
        self._starting_pool = threading.Lock()
        self._launcher: Any = None
        self._graph: weakref.ref | None = None
        self._idle: list[WorkerProcess] = []
        self._workers: set[WorkerProcess] = set()
        self._starting = 0
        self._closed = False

    @property
    def fork_server_pid(self) -> int | None:
        """Pid of this pool's fork server, if one is running."""
        return getattr(self._launcher, "pid", None)

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        with self.lock:
            return self._closed

    def check_open(self) -> None:
        """Raise ``BackendError`` if the backend was closed (a fan-out running meanwhile fails)."""
        with self.lock:
            if self._closed:
                raise BackendError("the process backend was closed while running")

    def ensure_launcher(self, graph: Any) -> None:
        """Have a launcher for ``graph`` ready: the one running, or a new pool for it."""
        # Held while a pool starts, so concurrent first fan-outs start one pool.
        with self._starting_pool:
            with self.lock:
                if self._closed:
                    raise BackendError("the process backend is closed")
                if self._launcher is not None and self._launcher.alive \
                        and self._graph is not None and self._graph() is graph:
                    return
                gone = self._launcher is not None and not self._launcher.alive
                gone_pid = getattr(self._launcher, "pid", None)
            # A backend serves one compiled graph; another graph (or a fork
            # server that died) gets a new pool.
            graph_bytes = pickle_graph(graph, "worker processes")
            if gone:
                logger.warning("process backend: fork server %s is gone (it exited, or a "
                               "request to it was interrupted); starting a new one", gone_pid)
            self._retire_pool()
            try:
                launcher = start_launcher(self.start_method, graph_bytes)
            except WorkerStartError as exc:
                raise BackendError(str(exc)) from exc
            with self.lock:
                if self._closed:
                    launcher.close()
                    raise BackendError("the process backend is closed")
                self._launcher, self._graph = launcher, weakref.ref(graph)

    def _retire_pool(self) -> None:
        with self.lock:
            idle, self._idle = self._idle, []
            launcher, self._launcher = self._launcher, None
            for worker in idle:
                self._workers.discard(worker)
        for worker in idle:
            worker.conn.close()
            worker.reap()
        if launcher is not None:
            launcher.close()

    def acquire(self, block: bool, give_up: Callable[[], bool] | None = None
                ) -> WorkerProcess | None:
        """An idle worker, a new one if the pool has room, or None (``block``: wait, until
        ``give_up()`` says to stop waiting; whoever sets it notifies ``lock``)."""
        with self.lock:
            while True:
                if self._closed:
                    raise BackendError("the process backend was closed while running")
                if give_up is not None and give_up():
                    return None
                while self._idle:
                    worker = self._idle.pop()
                    if not worker.conn.poll():  # an idle worker only speaks by dying
                        return worker
                    self._workers.discard(worker)
                    self.lock.release()
                    try:
                        how = worker.reap()
                    finally:
                        self.lock.acquire()
                    logger.warning("process backend: idle worker process %s %s; "
                                   "a new one takes its place", worker.pid, how)
                if len(self._workers) + self._starting < self.max_workers:
                    self._starting += 1
                    launcher = self._launcher
                    break
                if not block:
                    return None
                self.lock.wait()
        worker = None
        try:
            worker = launcher.start_worker(once=self.fresh)
        except WorkerStartError as exc:
            raise BackendError(str(exc)) from exc
        finally:
            with self.lock:
                self._starting -= 1
                if worker is not None:
                    self._workers.add(worker)
                self.lock.notify_all()  # a failed start frees its place too
        return worker

    def release(self, worker: WorkerProcess) -> None:
        """``worker`` finished its branch: idle again, or ended (fresh workers, a closed pool)."""
        if self.fresh:
            self.discard(worker, kill=False)
            return
        with self.lock:
            if not self._closed and worker in self._workers:
                self._idle.append(worker)
                self.lock.notify()
                return
        self.discard(worker, kill=True)

    def discard(self, worker: WorkerProcess, *, kill: bool) -> str:
        """End ``worker`` (``kill``: at once) and free its place; how it ended."""
        if kill:
            worker.kill()
        ending = worker.reap()
        with self.lock:
            self._workers.discard(worker)
            self.lock.notify()
        return ending

    def close(self) -> None:
        """Stop every worker and the launcher; nothing is left behind. Safe twice."""
        with self.lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = [w for w in self._workers if w not in idle]
            launcher, self._launcher = self._launcher, None
            self._workers.clear()
            self.lock.notify_all()
        for worker in idle:
            worker.conn.close()  # an idle worker exits when its connection closes
        for worker in busy:
            worker.kill()
        for worker in (*idle, *busy):
            worker.reap()
        if launcher is not None:
            launcher.close()
