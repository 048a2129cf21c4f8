"""The Dask backend: branches run as tasks on a ``distributed`` cluster.

The cluster is one given by address (``dask_address``), a client the caller
passes in (``client``), or, with neither, a ``LocalCluster`` of worker
processes on 127.0.0.1 started on first use and closed with the graph.

Each branch is one task running ``run_branch``, the function every backend
uses, so it gets a fresh Lua VM and its own copy of the state on the worker.
The compiled graph is scattered to the workers once per backend and passed
to every task as a dependency, never pickled per task.

A Dask worker cannot be killed per branch the way a process-backend worker
can, so Lua runs with its count hook (as on threads) and ``branch_timeout``
is enforced inside the branch. Only a branch stuck past its deadline in one
Python call is given up on by the client; its worker is then restarted.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..branch import BranchTask, ParallelFlowResult, cancelled_result, run_branch
from .base import register_backend
from .dask_cluster import (
    DEFAULT_CONNECT_TIMEOUT,
    Connection,
    DaskUnavailable,
    borrow,
    connect,
    start_local_cluster,
)
from .shipping import BackendError, pickle_graph

# A branch past its branch_timeout reports its own timeout (with its state)
# at a node boundary; the client gives it this much longer, network included.
TIMEOUT_GRACE_SECONDS = 1.0
# How long the scheduler may take to restart a worker stuck past a deadline.
RESTART_TIMEOUT_SECONDS = 30.0
# How long a fan-out waits for a cluster with no workers to get one.
WORKER_WAIT_SECONDS = 60.0
# How often a waiting fan-out looks at the client's connection and deadlines.
POLL_SECONDS = 0.25


@dataclass
class _FanOut:
    """What the branches of one fan-out share on the client side."""

    # Futures as they finish (their done callbacks put them here).
    finished: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    # Workers this fan-out had restarted; a task killed with one did not fail.
    restarted: set[str] = field(default_factory=set)


@dataclass
class _Branch:
    """One branch's task as the client follows it."""

    index: int
    task: BranchTask
    key: str
    fan_out: _FanOut
    submissions: int = 0
    # (client-side arrival time, worker address) of every start the workers
    # reported, over every submission; more starts than submissions means the
    # scheduler itself re-ran the task after its worker died.
    starts: list[tuple[float, str]] = field(default_factory=list)
    # Where the current submission's starts begin in ``starts``.
    current: int = 0

    @property
    def attempts(self) -> int:
        """How often the branch has run (or been sent to run) so far."""
        return max(self.submissions, len(self.starts))


class DaskBackend:
    """Runs branches as tasks on a Dask cluster.

    ``dask_address`` (alias ``address``): a running scheduler such as
    ``tcp://host:8786``. ``client``: a ``distributed.Client`` the caller
    owns (left open on close). With neither, a local cluster of
    ``max_workers`` (default: CPU count) single-threaded worker processes is
    started on first use. ``retries``: how often a branch whose worker died
    runs again elsewhere (default 0: it fails, naming the worker).
    ``connect_timeout``: seconds to reach the scheduler before failing.
    """

    name = "dask"
    # The runner checks this before fan-out: state must pickle to get here.
    crosses_processes = True

    def __init__(self, max_workers: int | None = None, *, dask_address: str | None = None,
                 address: str | None = None, client: Any = None, retries: int = 0,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        if dask_address and address and dask_address != address:
            raise ValueError(f"dask_address {dask_address!r} and address {address!r} disagree")
        address = dask_address or address
        if address is not None and not isinstance(address, str):
            raise ValueError(f"dask address must be a string like 'tcp://host:8786', "
                             f"got {address!r}")
        if address and client is not None:
            raise ValueError("give either a dask address or a client, not both")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if importlib.util.find_spec("distributed") is None:
            raise ValueError("isolation 'dask' needs Dask's distributed package: "
                             "pip install 'isobranch[dask]'")
        if (isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float))
                or connect_timeout <= 0):
            raise ValueError(f"connect_timeout must be a positive number, got {connect_timeout!r}")
        self.max_workers = max_workers
        self.address = address
        self.retries = retries
        self.connect_timeout = float(connect_timeout)
        self._given_client = client
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._graph: weakref.ref | None = None
        self._graph_future: Any = None
        self._topic = f"isobranch-{uuid.uuid4().hex}"
        self._following: dict[str, _Branch] = {}
        self._connection_confirms_starts = True

    # -- the cluster ---------------------------------------------------------

    def _connect(self) -> Connection:
        with self._lock:
            if self._closed:
                raise BackendError("the dask backend is closed")
            stale = self._connection
            if stale is not None and stale.owns_client and stale.client.status == "closed":
                # The scheduler went away and the client gave up: connect afresh.
                _quietly(stale.close)
                self._connection = self._graph_future = None
            if self._connection is None:
                try:
                    if self._given_client is not None:
                        connection = borrow(self._given_client)
                    elif self.address:
                        connection = connect(self.address, self.connect_timeout)
                    else:
                        connection = start_local_cluster(self.max_workers, self.connect_timeout)
                except DaskUnavailable as exc:
                    raise BackendError(str(exc)) from exc
                connection.client.subscribe_topic(self._topic, self._branch_started)
                self._connection = connection
                # Only the scheduler of a cluster isobranch started is known not to
                # re-run a task whose worker died; elsewhere every start is confirmed.
                self._connection_confirms_starts = connection.cluster is None
            return self._connection

    def _branch_started(self, event: tuple[float, dict]) -> None:
        # Runs on the client's event loop thread, as workers report starts.
        _, message = event
        with self._lock:
            branch = self._following.get(message.get("key"))
            if branch is not None:
                branch.starts.append((time.monotonic(), str(message.get("worker"))))

    def _ship_graph(self, client: Any, graph: Any) -> Any:
        """The graph's future on the cluster, scattered once (again only if it was lost)."""
        with self._lock:
            if (self._graph is not None and self._graph() is graph
                    and self._graph_future is not None and self._graph_future.status == "finished"):
                return self._graph_future
        # Backend options may hold live objects (a client) and workers never need them.
        shipped = copy.copy(graph)
        shipped.backend_options = {}
        pickle_graph(shipped, "Dask workers")  # names the node that cannot travel
        try:
            future = client.scatter(shipped, broadcast=True, hash=False,
                                    timeout=WORKER_WAIT_SECONDS)
        except TimeoutError as exc:
            raise BackendError(f"the Dask cluster at {self._connection_address()} had no "
                               f"worker to take the graph within {WORKER_WAIT_SECONDS:g}s") from exc
        with self._lock:
            self._graph, self._graph_future = weakref.ref(graph), future
        return future

    # -- running a fan-out ---------------------------------------------------

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` as Dask tasks and return their results in task order."""
        connection = self._connect()
        client = connection.client
        graph_future = self._ship_graph(client, tasks[0].graph)
        pending: dict[Any, _Branch] = {}
        results: list[ParallelFlowResult | None] = [None] * len(tasks)
        fan_out = _FanOut()
        try:
            for index, task in enumerate(tasks):
                branch = _Branch(index, task, key="", fan_out=fan_out)
                pending[self._submit(client, graph_future, branch)] = branch
            self._follow(connection, pending, results, fan_out.finished)
        finally:
            with self._lock:
                for branch in pending.values():
                    self._following.pop(branch.key, None)
            if pending:  # interrupted or the connection was lost: nothing may keep running
                _quietly(client.cancel, list(pending))
        return [r for r in results if r is not None]

    def _submit(self, client: Any, graph_future: Any, branch: _Branch) -> Any:
        task = branch.task
        branch.key = f"isobranch-{task.label.replace('/', '.')}-{uuid.uuid4().hex}"
        branch.submissions += 1
        branch.current = len(branch.starts)
        with self._lock:
            self._following[branch.key] = branch
        payload = {"branch": task.branch, "fan_in": task.fan_in, "snapshot": task.snapshot,
                   "limits": task.limits, "isolation": task.isolation, "path": task.path}
        future = client.submit(run_on_worker, graph_future, payload, self._topic, branch.key,
                               self._connection_confirms_starts, key=branch.key, pure=False)
        future.add_done_callback(branch.fan_out.finished.put)
        return future

    def _follow(self, connection: Connection, pending: dict[Any, _Branch],
                results: list[ParallelFlowResult | None], finished: queue.SimpleQueue) -> None:
        client = connection.client
        disconnected_since: float | None = None
        while pending:
            done = set()
            try:
                done.add(finished.get(timeout=self._wakeup(pending)))
                while True:
                    done.add(finished.get_nowait())
            except queue.Empty:
                pass
            # A future given up on (timeout, fail_fast) may still finish later; one
            # the scheduler dropped (cancelled, lost) reports through no callback.
            done = {future for future in done if future in pending}
            done.update(future for future in pending if future.status != "pending")
            self._collect(client, connection, done, pending, results)
            self._judge_running(client, connection, pending, results)
            failed = next((r for r in results if r is not None and not r.success), None)
            if failed is not None and failed.error_type != "Cancelled" and pending \
                    and pending[next(iter(pending))].task.limits.fail_fast:
                reason = f"cancelled: branch {failed.branch!r} failed first (fail_fast)"
                _quietly(client.cancel, list(pending))
                for branch in pending.values():
                    results[branch.index] = cancelled_result(branch.task, reason)
                self._forget(pending, list(pending))
            if client.status == "running":
                disconnected_since = None
            elif disconnected_since is None:
                disconnected_since = time.monotonic()
            elif time.monotonic() - disconnected_since > self.connect_timeout:
                for branch in pending.values():
                    results[branch.index] = _failed(
                        branch, f"lost the connection to the Dask scheduler at "
                        f"{connection.address} (client status {client.status!r})", "DaskError")
                self._forget(pending, list(pending))

    def _wakeup(self, pending: dict[Any, _Branch]) -> float:
        deadlines = [started + limit + TIMEOUT_GRACE_SECONDS
                     for branch in pending.values()
                     if (limit := branch.task.limits.branch_timeout)
                     for started in _last_start(branch)]
        if not deadlines:
            return POLL_SECONDS
        return min(max(min(deadlines) - time.monotonic(), 0.0), POLL_SECONDS)

    def _collect(self, client: Any, connection: Connection, done: set, pending: dict[Any, _Branch],
                 results: list[ParallelFlowResult | None]) -> None:
        finished = [future for future in done if future.status == "finished"]
        if finished:
            try:
                values = client.gather(finished)
            except Exception:  # one result was lost; fetch them one by one to tell which
                values = [_result_or_error(future) for future in finished]
            for future, value in zip(finished, values, strict=True):
                branch = pending[future]
                rerun = self._rerun_failure(branch, connection)
                if rerun is not None:
                    results[branch.index] = rerun
                elif isinstance(value, ParallelFlowResult):
                    results[branch.index] = value
                else:
                    results[branch.index] = _failed(
                        branch, f"its result could not be fetched from the cluster: {value}",
                        "DaskError")
            self._forget(pending, finished)
        for future in [f for f in done if f.status != "finished"]:
            branch = pending[future]
            self._forget(pending, [future])
            error = _quietly(future.exception) if future.status == "error" else None
            dead = _dead_worker(error)
            # Killed with a worker this fan-out restarted (queued behind or beside
            # a stuck branch) is not the branch's failure: it runs again.
            if dead is not None and (dead in branch.fan_out.restarted
                                     or branch.attempts <= self.retries):
                pending[self._submit(client, self._ship_graph(client, branch.task.graph),
                                     branch)] = branch
                continue
            results[branch.index] = _failed(branch, _describe_failure(
                branch, future.status, error, dead, connection), _error_type(error, dead))

    def _judge_running(self, client: Any, connection: Connection, pending: dict[Any, _Branch],
                       results: list[ParallelFlowResult | None]) -> None:
        now = time.monotonic()
        for future, branch in list(pending.items()):
            rerun = self._rerun_failure(branch, connection)
            if rerun is not None:
                results[branch.index] = rerun
                _quietly(future.cancel)
                self._forget(pending, [future])
                continue
            limit = branch.task.limits.branch_timeout
            started = _last_start(branch)
            if limit and started and now >= started[0] + limit + TIMEOUT_GRACE_SECONDS:
                worker = branch.starts[-1][1]
                results[branch.index] = ParallelFlowResult(
                    branch=branch.task.branch, state=branch.task.snapshot.copy(), success=False,
                    error=(f"branch {branch.task.label!r} timed out after {limit:g}s: stuck in "
                           f"one call on Dask worker {worker}, which is being restarted"),
                    error_type="BranchTimeout", timed_out=True,
                    duration_ms=(now - started[0]) * 1000.0, isolation=self.name, worker=worker)
                _quietly(future.cancel)
                self._forget(pending, [future])
                branch.fan_out.restarted.add(worker)
                _restart_in_background(client, worker)

    def _rerun_failure(self, branch: _Branch, connection: Connection) -> ParallelFlowResult | None:
        """A failed result if the scheduler re-ran the branch more often than asked."""
        restarted = branch.fan_out.restarted
        runs = [worker for _, worker in branch.starts[:-1] if worker not in restarted]
        if len(runs) + 1 <= self.retries + 1:
            return None
        # Its allowed-failures is above isobranch's retries: the scheduler re-ran
        # the task itself after its worker died.
        dead, rerun_on = runs[-1], branch.starts[-1][1]
        plural = "y" if self.retries == 1 else "ies"
        return _failed(branch, f"Dask worker {dead} died while running it (the scheduler at "
                       f"{connection.address} re-ran it on {rerun_on}; isobranch allows "
                       f"{self.retries} retr{plural})", "WorkerDied")

    def _connection_address(self) -> str:
        connection = self._connection
        return connection.address if connection is not None else "(closed)"

    def _forget(self, pending: dict[Any, _Branch], futures: list[Any]) -> None:
        with self._lock:
            for future in futures:
                branch = pending.pop(future)
                self._following.pop(branch.key, None)

    def close(self) -> None:
        """Drop the scattered graph and close the client and cluster isobranch started.

        A client passed in by the caller stays open (its cluster is theirs).
        """
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
            graph_future, self._graph_future = self._graph_future, None
        if connection is None:
            return
        if graph_future is not None:
            _quietly(graph_future.release)
        _quietly(connection.client.unsubscribe_topic, self._topic)
        connection.close()


def run_on_worker(graph: Any, payload: dict[str, Any], topic: str, key: str,
                  confirm_start: bool) -> ParallelFlowResult:
    """The Dask task: one branch on this worker, reported as started first.

    ``confirm_start`` waits until the scheduler has the report, so a re-run
    after this worker dies can never go unnoticed (on a scheduler that
    re-runs tasks); otherwise the report is sent without waiting.
    """
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    started = {"key": key, "worker": worker.address}
    if confirm_start:
        sync(worker.loop, worker.scheduler.log_event, topic=topic, msg=started)
    else:
        worker.log_event(topic, started)
    result = run_branch(BranchTask(graph=graph, **payload))
    result.worker = worker.address
    return result


def _last_start(branch: _Branch) -> list[float]:
    """When the current submission last started running, as a list of zero or one."""
    return [branch.starts[-1][0]] if len(branch.starts) > branch.current else []


def _failed(branch: _Branch, reason: str, error_type: str) -> ParallelFlowResult:
    task = branch.task
    return ParallelFlowResult(
        branch=task.branch, state=task.snapshot.copy(), success=False,
        error=f"branch {task.label!r}: {reason}", error_type=error_type, isolation="dask",
        worker=branch.starts[-1][1] if branch.starts else None)


def _dead_worker(error: BaseException | None) -> str | None:
    """The address of the worker whose death failed the task, if that is what happened."""
    if type(error).__name__ != "KilledWorker":
        return None
    last = getattr(error, "last_worker", None)
    return str(getattr(last, "address", last)) if last is not None else "(unknown worker)"


def _describe_failure(branch: _Branch, status: str, error: BaseException | None,
                      dead: str | None, connection: Connection) -> str:
    if dead is not None:
        tried = f" after {branch.attempts} attempts" if branch.attempts > 1 else ""
        return f"Dask worker {dead} died while running it{tried}"
    if error is not None:
        hint = ""
        if isinstance(error, ImportError):
            hint = " (is isobranch installed on every Dask worker?)"
        return f"the Dask task failed on the worker: {type(error).__name__}: {error}{hint}"
    if connection.client.status != "running":
        return (f"lost the connection to the Dask scheduler at {connection.address} "
                f"(the task is {status})")
    return f"the Dask scheduler at {connection.address} dropped the task (status {status!r})"


def _error_type(error: BaseException | None, dead: str | None) -> str:
    if dead is not None:
        return "WorkerDied"
    return type(error).__name__ if error is not None else "DaskError"


def _result_or_error(future: Any) -> Any:
    try:
        return future.result(timeout=POLL_SECONDS * 4)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _restart_in_background(client: Any, worker: str) -> None:
    """Restart a worker stuck in a branch past its deadline without waiting for it.

    Needs a nanny (``dask worker`` and ``LocalCluster`` have one); without
    one the restart fails quietly and the call runs on until it returns.
    """
    coroutine = client.scheduler.restart_workers(
        workers=[worker], timeout=RESTART_TIMEOUT_SECONDS, on_error="return",
        stimulus_id=f"isobranch-branch-timeout-{time.time()}")
    try:
        asyncio.run_coroutine_threadsafe(coroutine, client.loop.asyncio_loop)
    except Exception:
        coroutine.close()


def _quietly(function: Any, *args: Any) -> Any:
    # Cleanup on a cluster that may be gone: the failure is already reported.
    try:
        return function(*args)
    except Exception:
        return None


register_backend("dask", DaskBackend)
