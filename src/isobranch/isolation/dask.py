"""The Dask backend: branches run as tasks on a ``distributed`` cluster.

The cluster is one given by address (``dask_address``), a client the caller
passes in (``client``), or, with neither, a ``LocalCluster`` of worker
processes on 127.0.0.1 started on first use and closed with the graph.

Each branch runs ``run_branch`` in a task, the function every backend
uses, so it gets a fresh Lua VM and its own copy of the state on the worker.
The compiled graph travels once, in a worker plugin the scheduler hands to
every worker (also to workers that join or restart later), never per task.

A Dask worker cannot be killed per branch the way a process-backend worker
can, so Lua runs with its count hook (as on threads) and ``branch_timeout``
is enforced inside the branch. A branch stuck past its deadline in one
Python call is given up on by the client, and its worker is restarted.

Short branches run many per task (``dask_batches``); one fan-out's queue
and tasks are ``dask_fanout``'s. What a branch is to the client and which
of its runs count against ``retries`` live in ``dask_branches``. This
module stays longer than most (about 780 lines) because what remains is
one loop and the checks it makes on every wake-up (deadlines, worker
deaths, memory restarts, a silent scheduler) against the one client and
lock they share.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib.util
import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..branch import ParallelFlowResult, failed_result
from ..error_kinds import ErrorKind
from ..errors import BackendError, ConfigError, DaskUnavailable, TaskAlreadyClaimed
from .base import BackendFanOut, Finished, IsolationBackend, RunSource
from .by_value import Receiver
from .dask_batches import (
    MAX_BATCH,
    TASKS_PER_SLOT,
    Followed,
    FollowedBatch,
    batch_results,
    branches_of,
    describe_task,
    pack_payloads,
)
from .dask_branches import (
    FETCH_SECONDS,
    FanOutWatch,
    FollowedBranch,
    MemoryRestarts,
    RunLedger,
    StoppedUnheard,
    dead_worker,
    describe_failure,
    error_type,
    failed,
    load_failure,
    quietly,
    result_or_error,
)
from .dask_cluster import (
    DEFAULT_CONNECT_TIMEOUT,
    INSTALL_HINT,
    Connection,
    borrow,
    connect,
    start_local_cluster,
)
from .dask_fanout import DaskFanOut
from .memory_limit import BRANCH_MEMORY_ERROR, format_size, memory_message
from .shipping import ship_graph

if TYPE_CHECKING:
    from ..branch import BranchGraph

logger = logging.getLogger(__name__)

# A branch past its branch_timeout reports its own timeout (with its state)
# at a node boundary; the client gives it this much longer, network included.
TIMEOUT_GRACE_SECONDS = 1.0
# How long the scheduler may take to restart a worker stuck past a deadline.
RESTART_TIMEOUT_SECONDS = 30.0
# How often a waiting fan-out looks at its branches, the client and the clock.
POLL_SECONDS = 0.25
# A fan-out that heard nothing from the scheduler for this long asks it
# whether it is still there (and has any worker).
QUIET_SECONDS = 5.0
DEFAULT_WORKER_WAIT = 60.0
# The nanny's "restarted for memory" event and the task's failure travel on
# different connections; a death is matched with its event for this long.
MEMORY_EVENT_SECONDS = 5.0
# The smallest branch_max_memory the local cluster takes (it caps whole workers).
MIN_WORKER_MEMORY = 128 * 1024 * 1024
# The topic on which a nanny reports a worker it restarted for memory.
MEMORY_RESTART_TOPIC = "worker-restart-memory"


class DaskBackend(IsolationBackend):
    """Runs branches as tasks on a Dask cluster.

    ``dask_address`` (alias ``address``): a running scheduler such as
    ``tcp://host:8786``. ``client``: a ``distributed.Client`` the caller
    owns (left open on close). With neither, a local cluster of
    ``max_workers`` (default: CPU count) single-threaded worker processes is
    started on first use; ``max_workers`` only sizes that local cluster.
    ``retries``: how often a branch whose worker died runs again elsewhere
    (default 0: it fails, naming the worker). ``connect_timeout``: seconds
    the scheduler may take to answer. ``worker_wait``: seconds a fan-out
    waits for a cluster without workers to get one.
    """

    name = "dask"
    # The runner checks this before fan-out: state must pickle to get here.
    crosses_processes = True
    # Branches are taken ahead to fill batches (queued in the fan-out, then waiting
    # at the scheduler); how many the fan-out holds, its ``BatchSizer`` decides.
    tasks_ahead_per_worker = TASKS_PER_SLOT * MAX_BATCH
    # A branch stuck past its deadline in one call is given up on; its worker restarts.
    kills_overdue = True
    kill_grace_seconds = TIMEOUT_GRACE_SECONDS

    def __init__(self, max_workers: int | None = None, *, dask_address: str | None = None,
                 address: str | None = None, client: Any = None, retries: int = 0,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 worker_wait: float = DEFAULT_WORKER_WAIT) -> None:
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        if dask_address and address and dask_address != address:
            raise ConfigError(f"dask_address {dask_address!r} and address {address!r} disagree")
        address = dask_address or address
        if address is not None and not isinstance(address, str):
            raise ConfigError(f"dask address must be a string like 'tcp://host:8786', "
                             f"got {address!r}")
        if address and client is not None:
            raise ConfigError("give either a dask address or a client, not both")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {retries!r}")
        for option, value in (("connect_timeout", connect_timeout),
                              ("worker_wait", worker_wait)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{option} must be a positive number, got {value!r}")
        if importlib.util.find_spec("distributed") is None:
            raise ConfigError("isolation 'dask' needs Dask's distributed package "
                             f"{INSTALL_HINT}")
        self.max_workers = max_workers
        self.address = address
        self.retries = retries
        self.connect_timeout = float(connect_timeout)
        self.worker_wait = float(worker_wait)
        self._given_client = client
        self._connection: Connection | None = None
        # Guards what the client's event-loop thread touches (starts, nodes).
        self._lock = threading.Lock()
        # Serialises connecting and shipping the graph (slow, never under _lock).
        self._ship_lock = threading.Lock()
        self._closed = False
        self._graph: weakref.ref | None = None
        self._plugin: str | None = None
        self._topic = f"isobranch-{uuid.uuid4().hex}"
        # What the workers' events name: branches and batches, by key.
        self._following: dict[str, FollowedBranch | FollowedBatch] = {}
        # Workers this backend restarted: a branch killed with one of them did
        # not fail and runs again; other deaths count against ``retries``.
        self._runs = RunLedger(retries, self._lock)
        # Tasks stopped before their starts arrived: their workers restart when they do.
        self._stopped_unheard = StoppedUnheard()
        self._memory_restarts = MemoryRestarts()

    def check_branch_max_memory(self, limit: int) -> str | None:
        """Only the local cluster isobranch starts is given ``branch_max_memory`` per worker."""
        if self.address or self._given_client is not None:
            return ("isolation 'dask' enforces it only on the local cluster isobranch starts; "
                    "a cluster given by address or client is configured by its owner: set its "
                    "workers' memory limit there (dask worker --memory-limit, or "
                    "LocalCluster(memory_limit=...)) and leave branch_max_memory unset")
        if limit < MIN_WORKER_MEMORY:
            # Below it a worker would be restarted for memory before it ran anything.
            return (f"on isolation 'dask' it caps each local worker process as a whole, and a "
                    f"Dask worker uses about 60 MiB by itself: give at least "
                    f"{format_size(MIN_WORKER_MEMORY)}, got {format_size(limit)}")
        return None

    # -- the cluster and the graph on it --------------------------------------

    def _prepare(self, graph: Any) -> tuple[Connection, str]:
        """The connection, and the name of the plugin carrying ``graph`` to the workers."""
        with self._ship_lock:
            if self._closed:
                raise BackendError("the dask backend is closed")
            connection = self._connection
            if connection is not None and not connection.usable:
                if not connection.owns_client:
                    raise BackendError("the distributed.Client passed in is closed")
                # The scheduler went away and the client gave up: connect afresh.
                quietly(connection.close)
                connection = self._connection = None
                self._plugin = None
            if connection is None:
                try:
                    if self._given_client is not None:
                        connection = borrow(self._given_client)
                    elif self.address:
                        connection = connect(self.address, self.connect_timeout)
                    else:
                        connection = start_local_cluster(
                            self.max_workers, self.connect_timeout,
                            memory_limit=getattr(graph, "branch_max_memory", None))
                        connection.client.subscribe_topic(MEMORY_RESTART_TOPIC,
                                                          self._memory_restarts.on_event)
                    connection.client.subscribe_topic(self._topic, self._on_event)
                except DaskUnavailable as exc:
                    raise BackendError(str(exc)) from exc.__cause__  # the message says it all
                self._connection = connection
            if self._plugin is None or self._graph is None or self._graph() is not graph:
                self._ship(connection, graph)
            assert self._plugin is not None
            return connection, self._plugin

    def _ship(self, connection: Connection, graph: Any) -> None:
        from .dask_worker import GraphPlugin

        # Backend options may hold live objects (a client); workers never need them.
        shipped = copy.copy(graph)
        shipped.backend_options = {}
        # A user's cluster has an environment of its own: the caller's modules travel
        # by value. The local cluster's workers are spawned with the caller's sys.path,
        # so what they can import goes by reference, as to process workers: its classes
        # stay the same classes, and its tracebacks keep their files and source lines.
        receiver = Receiver.CALLERS_SYS_PATH if connection.cluster is not None \
            else Receiver.INSTALLED_PACKAGES
        pickled = ship_graph(shipped, "Dask workers", receiver)
        if pickled.by_value:
            logger.debug("dask backend: the graph carries module(s) %s by value",
                         ", ".join(pickled.by_value))
        # Workers of the local cluster volunteer for the OOM killer; a user's are left alone.
        plugin = GraphPlugin(pickled.data, raise_oom_score=connection.cluster is not None,
                             by_reference=pickled.by_reference)
        name = f"isobranch-graph-{uuid.uuid4().hex}"
        client = connection.client
        failed = f"could not send the graph to the Dask cluster at {connection.address}"
        try:
            # The scheduler waits for every current worker to take the plugin;
            # a worker that cannot load the graph answers at once.
            client.sync(client.register_plugin, plugin, name=name,
                        callback_timeout=self.worker_wait)
        except Exception as exc:
            # The scheduler keeps a plugin whose registration failed, and would
            # hand it to every worker that joins: take it off again.
            self._unregister(connection, name)
            if isinstance(exc, BackendError):  # raised by the worker's plugin: names the worker
                raise BackendError(f"{failed}: {exc}") from exc
            if isinstance(exc, TimeoutError):
                raise BackendError(f"{failed}: its workers did not all take it within "
                                   f"{self.worker_wait:g}s") from exc
            # The plugin itself could not be loaded (no isobranch there?).
            raise BackendError(f"{failed}: {load_failure(exc, pickled.by_reference)}") from exc
        if self._plugin is not None:
            self._unregister(connection, self._plugin)
        self._plugin, self._graph = name, weakref.ref(graph)

    def _unregister(self, connection: Connection, plugin: str) -> None:
        # Bounded: a scheduler that stopped answering must not hang anybody.
        client = connection.client
        quietly(functools.partial(client.sync, client.unregister_worker_plugin, plugin,
                                   callback_timeout=self.connect_timeout))

    def _killed_for_memory(self, branch: FollowedBranch, dead: str | None,
                           connection: Connection) -> ParallelFlowResult | None:
        """A ``BranchMemoryError`` result if the branch's worker was restarted for memory."""
        limit = branch.task.limits.branch_max_memory
        if dead is None or limit is None or connection.cluster is None:
            return None
        with self._lock:
            if not branch.ran_on(dead):
                return None  # only queued there: not the branch that used the memory
        if self._runs.exonerated(branch, dead):
            return None  # another branch ran there when it was restarted
        used = self._memory_restarts.used_by(dead, MEMORY_EVENT_SECONDS)
        if used is None:
            return None
        result = failed(branch, "", BRANCH_MEMORY_ERROR)
        result.error = memory_message(
            branch.task.name, branch.node, limit,
            f"Dask worker {dead} reached {format_size(used)} and its nanny restarted it")
        return result

    def _on_event(self, event: tuple[float, dict]) -> None:
        # Runs on the client's event-loop thread as workers report progress.
        _, message = event
        now = time.monotonic()
        with self._lock:
            key = message.get("key")
            if message.get("kind") == "start" and self._stopped_unheard.take(key):
                late_start = str(message.get("worker"))
            else:
                late_start = None
            followed = self._following.get(key)
            if followed is not None:
                self._follow(followed, message, now)  # its claim is let go with its fan-out's
            # Its fan-out let go of its claims before this one was heard of.
            late_claims = [str(message["claim"])] if (
                late_start is not None and followed is None and message.get("claim")) else []
        connection = self._connection
        if late_start is not None and connection is not None:
            # Stopped before this start arrived: nothing else would ever stop it.
            logger.debug("dask backend: restarting Dask worker %s, which started a task of a "
                         "fan-out stopped before it heard of it", late_start)
            self._restart(connection, [late_start])
            self._let_go(connection, late_claims)

    def _follow(self, followed: Followed, message: dict, now: float) -> None:
        """Note a worker's report on ``followed`` (under the lock)."""
        followed.fan_out.heard_at = now
        kind = message.get("kind")
        if kind == "start":
            if message.get("claim"):
                followed.fan_out.claims.append(str(message["claim"]))
            worker = str(message.get("worker"))
            followed.starts.append((now, worker))
            self._runs.worker_started(worker, message.get("threads"))
            if isinstance(followed, FollowedBatch):
                return  # its branches' starts come as "item" (when they have deadlines)
        if isinstance(followed, FollowedBatch):
            return
        if kind == "item" and followed.batch is not None:
            # The branch before it in the batch has finished: no deadline of its
            # own runs any more (its result comes with the batch's).
            number = int(followed.key.rsplit("/", 1)[1])
            if number:
                followed.batch.items[number - 1].run.started_at = None
        if kind in ("start", "item"):
            followed.run.started_at = now  # the driver's deadline counts from here
            # A branch begins at the node it is named after; later nodes are
            # reported as entered (unless a call holding the GIL stops that).
            followed.node = followed.task.start
        elif kind == "node":
            followed.node = str(message.get("node"))

    # -- running a fan-out ---------------------------------------------------

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """One fan-out of ``graph`` on the cluster (connected to, or started, now)."""
        connection, plugin = self._prepare(graph)
        return DaskFanOut(self, source, connection, plugin, self._worker_slots(connection))

    def _worker_slots(self, connection: Connection) -> int:
        """How many branches the cluster runs at once: its worker threads."""
        client = connection.client
        try:
            # Bounded: a scheduler that stopped answering is reported by the fan-out.
            threads = client.sync(client.scheduler.ncores, callback_timeout=self.connect_timeout)
            total = sum(threads.values()) if isinstance(threads, dict) else 0
        except Exception as exc:
            logger.debug("dask backend: the scheduler did not say how many threads its workers "
                         "have (%s: %s); assuming max_workers", type(exc).__name__, exc)
            total = 0
        return total or self.max_workers or os.cpu_count() or 1

    def submit(self, client: Any, plugin: str, branch: FollowedBranch) -> Any:
        """Submit ``branch`` as a Dask task (again, after its worker died); its future."""
        from .dask_worker import run_on_worker

        task = branch.task
        branch.key = f"isobranch-{task.name.replace('/', '.')}-{uuid.uuid4().hex}"
        with self._lock:
            branch.current = len(branch.starts)
            branch.finished_after = None
            branch.run.started_at = None
            self._following[branch.key] = branch
        future = branch.future = client.submit(run_on_worker, plugin, task.payload(),
                                               self._topic, branch.key, key=branch.key,
                                               pure=False)
        future.add_done_callback(branch.on_done)
        return future

    def submit_batch(self, client: Any, plugin: str, batch: FollowedBatch) -> Any:
        """Submit the branches of ``batch`` as one Dask task; its future."""
        from .dask_worker import run_batch_on_worker

        batch.key = f"isobranch-batch-{uuid.uuid4().hex}"
        with self._lock:
            for number, item in enumerate(batch.items):
                item.key, item.batch = f"{batch.key}/{number}", batch
                item.run.started_at = None
                self._following[item.key] = item
            self._following[batch.key] = batch
        # Each start is reported only for branches with a deadline to count from it.
        report_starts = bool(batch.items[0].task.limits.branch_timeout)
        future = batch.future = client.submit(
            run_batch_on_worker, plugin, pack_payloads([item.task.payload()
                                                        for item in batch.items]),
            self._topic, batch.key, [item.key for item in batch.items], report_starts,
            key=batch.key, pure=False)
        future.add_done_callback(batch.fan_out.finished.put)
        return future

    def _dissolve(self, client: Any, plugin: str, batch: FollowedBatch,
                  pending: dict[Any, Followed], without: FollowedBranch | None = None) -> None:
        """Run each branch of ``batch`` (whose task is gone) again in a task of its own.

        None of them has a result (a batch returns them together), so none
        ran to a recorded success. Alone, each start is confirmed before the
        branch runs: a branch that kills its worker again is named exactly,
        and counts against ``retries`` from then on.
        """
        for item in batch.items:
            if item is not without:
                item.batch = None
                pending[self.submit(client, plugin, item)] = item

    def follow_once(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                    results: list[Finished], fan_out: FanOutWatch, timeout: float | None
                    ) -> str | None:
        """Wait for a branch to finish (or a wake-up, for at most ``timeout`` and
        ``POLL_SECONDS``), and put what is done in ``results``.

        Returns why nothing pending can finish any more, if so (its branches
        are then failed with that reason).
        """
        try:
            fan_out.finished.get(timeout=POLL_SECONDS if timeout is None
                                 else min(timeout, POLL_SECONDS))
            fan_out.heard_at = time.monotonic()
            while True:
                fan_out.finished.get_nowait()
        except queue.Empty:
            pass
        lost = self._lost(connection, fan_out, pending)
        if lost is not None:
            for branch in branches_of(pending.values()):
                results.append((branch.run, failed(branch, lost, ErrorKind.DASK_ERROR)))
            self.stop_running(connection, pending.values())
            self.forget(pending, list(pending))
            return lost
        self._judge_reruns(connection, plugin, pending, results)
        self._collect(connection, plugin, pending, results)
        return None

    def _lost(self, connection: Connection, fan_out: FanOutWatch,
              pending: dict[Any, Followed]) -> str | None:
        """Why no pending branch can finish any more, if that is the case."""
        if self._closed:
            # As on the process backend: the whole fan-out fails, not its branches.
            raise BackendError("the dask backend was closed while running")
        client = connection.client
        # One message for every way the connection is found lost, so each
        # pending branch (being fetched or still running) reports it alike.
        lost = (f"lost the connection to the Dask scheduler at {connection.address} "
                f"(not back within {self.connect_timeout:g}s)")
        if not connection.usable:
            if connection.owns_client:
                # Only close() closes a client isobranch made, and that raised
                # above: distributed closed it after failing to reconnect.
                return lost
            return "the Dask client passed in was closed while running"
        now = time.monotonic()
        if client.status != "running":
            # Reconnecting after the scheduler dropped the connection.
            return lost if now - fan_out.heard_at > self.connect_timeout else None
        probe = fan_out.probe
        if probe is not None and probe.done():
            fan_out.probe = None
            try:
                n_workers = probe.result().get("n_workers", 1)
            except TimeoutError:
                return (f"the Dask scheduler at {connection.address} stopped answering "
                        f"(no reply within {self.connect_timeout:g}s)")
            except Exception as exc:  # the connection closed under the question, or was refused
                logger.debug("dask backend: asking the scheduler whether it is there failed: "
                             "%s: %s", type(exc).__name__, exc)
                return (f"lost the connection to the Dask scheduler at {connection.address} "
                        f"(the connection broke: {type(exc).__name__})")
            fan_out.heard_at = now
            nothing_started = not any(branch.starts for branch in pending.values())
            if n_workers == 0 and nothing_started:
                fan_out.no_workers_since = fan_out.no_workers_since or now
                if now - fan_out.no_workers_since > self.worker_wait:
                    return (f"the Dask cluster at {connection.address} had no worker for "
                            f"{self.worker_wait:g}s")
            else:
                fan_out.no_workers_since = None
        elif probe is None and now - fan_out.heard_at > QUIET_SECONDS:
            fan_out.probe = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(client.scheduler.identity(n_workers=0), self.connect_timeout),
                client.loop.asyncio_loop)
        return None

    def _judge_reruns(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                      results: list[Finished]) -> None:
        """Fail a pending branch that ran more often than ``retries`` allows (its earlier
        runs on workers that died; see ``RunLedger.rerun_failure``). A batch is never
        judged here: its key is claimed by one run only, so it has at most one start."""
        for future, branch in list(pending.items()):
            if future.status != "pending" or isinstance(branch, FollowedBatch):
                continue  # finished meanwhile: _collect takes it as it is
            rerun = self._runs.rerun_failure(branch, connection.address)
            if rerun is not None:
                results.append((branch.run, rerun))
                quietly(future.cancel)
                self.forget(pending, [future])

    def give_up(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                branch: FollowedBranch) -> ParallelFlowResult | None:
        """``branch`` is stuck past its ``branch_timeout``: its timed-out result, and its
        worker restarted; None if it has just finished (its result is collected).
        The other branches of its batch run again, each in a task of its own."""
        batch = branch.batch
        future = branch.future if batch is None else batch.future
        if future is None or future.status != "pending":
            return None
        worker = branch.running_on if batch is None else batch.running_on
        limit, started = branch.task.limits.branch_timeout or 0.0, branch.run.started_at
        if started is None or time.monotonic() < started + limit:
            return None  # it runs again since (a batch-mate was given up on), or finished
        now = time.monotonic()
        where = f" in node {branch.node!r}" if branch.node else ""
        result = failed_result(
            branch.task,
            f"branch {branch.task.name!r} timed out after {limit:g}s{where}: "
            f"stuck in one call on Dask worker {worker}, which is being restarted",
            ErrorKind.BRANCH_TIMEOUT, state=branch.task.initial_state(), timed_out=True,
            duration_ms=(now - started) * 1000.0, isolation=self.name, worker=worker,
            node=branch.node)
        quietly(future.cancel)
        self.forget(pending, [future])
        if batch is not None:
            self._dissolve(connection.client, plugin, batch, pending, without=branch)
        logger.warning("dask backend: branch %r is stuck past its %gs branch_timeout on Dask "
                       "worker %s; restarting that worker", branch.task.name, limit, worker)
        if worker is not None:
            self._restart(connection, [worker])
        return result

    def _collect(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                 results: list[Finished]) -> None:
        client = connection.client
        # Read each status once: the event-loop thread may change it meanwhile.
        statuses = {future: future.status for future in pending}
        finished = [future for future, status in statuses.items() if status == "finished"]
        # Finished, but their results died as they were fetched, and their recomputes ran nothing.
        unclaimed: list[tuple[Any, Followed]] = []
        if finished:
            values = self._fetch(client, finished)
            if values is None:
                return  # not now: deadlines are judged again before the next try
            for future, value in zip(finished, values, strict=True):
                branch = pending[future]
                if isinstance(value, TaskAlreadyClaimed):
                    unclaimed.append((future, branch))
                    continue
                if isinstance(branch, FollowedBatch):
                    results.extend(batch_results(branch, value))
                    continue
                rerun = self._runs.rerun_failure(branch, connection.address)
                if rerun is not None:
                    results.append((branch.run, rerun))
                elif isinstance(value, ParallelFlowResult):
                    if branch.fan_out.sizer is not None:
                        branch.fan_out.sizer.observe(1, value.duration_ms / 1000.0)
                    results.append((branch.run, value))
                else:
                    results.append((branch.run, failed(
                        branch, f"its result could not be fetched from the cluster: {value}",
                        ErrorKind.DASK_ERROR)))
            self.forget(pending, finished)
        for future, task in unclaimed:
            self._ran_nothing(connection, plugin, pending, future, task, results)
        for future, status in statuses.items():
            if status in ("pending", "finished"):
                continue
            if status in ("cancelled", "lost") and client.status != "running":
                continue  # the client cancels its tasks when it loses the scheduler: _lost judges
            branch = pending[future]
            self.forget(pending, [future])
            if status == "lost":
                self._result_died(client, plugin, pending, future, branch)
                continue
            error = quietly(future.exception) if status == "error" else None
            if isinstance(error, TaskAlreadyClaimed):
                self._ran_nothing(connection, plugin, pending, future, branch, results)
                continue
            self._task_failed(connection, plugin, pending, branch, status, error,
                              dead_worker(error), results)

    def _result_died(self, client: Any, plugin: str, pending: dict[Any, Followed],
                     future: Any, task: Followed) -> None:
        """The task finished, but its result died with its worker before it was fetched:
        nothing of it was reported, and it is not its branches' failure (that run does not
        count against ``retries``). The scheduler computes the key again for as long as
        this client holds its future, but that run finds the key claimed and runs
        nothing: the branches run again now, each in a new task of its own."""
        logger.warning("dask backend: the result of %s died with its Dask worker before it "
                       "was fetched; it runs again", describe_task(task))
        if isinstance(task, FollowedBranch):  # a batch's runs are never counted
            self._runs.result_lost(task)
        quietly(future.cancel)
        if isinstance(task, FollowedBatch):
            self._dissolve(client, plugin, task, pending)
        else:
            pending[self.submit(client, plugin, task)] = task

    def _ran_nothing(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                     future: Any, task: Followed, results: list[Finished]) -> None:
        """A run of the task found its key claimed by an earlier run, whose result this
        client never took: that run's worker died under it (and a user's scheduler ran
        the task again), or its result died before it was fetched."""
        if isinstance(task, FollowedBatch):
            logger.warning("dask backend: the first run of %s ended without a result; each "
                           "of its branches runs again in a task of its own",
                           describe_task(task))
            self._dissolve(connection.client, plugin, task, pending)
            return
        if task.finished_after is not None:
            # Its first run finished (a run that ran nothing raises, so never counts as
            # finished), and its result died with its worker: its "lost" went unseen.
            self._result_died(connection.client, plugin, pending, future, task)
            return
        # It died with the worker it ran on (a branch whose start never arrived was only
        # queued there, as far as anyone can tell).
        self._task_failed(connection, plugin, pending, task, "error", None,
                          task.running_on or "(unknown worker)", results)

    def _task_failed(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                     branch: Followed, status: str, error: BaseException | None,
                     dead: str | None, results: list[Finished]) -> None:
        """The task of ``branch`` (already forgotten) ended without a result: ``error``, or
        its worker ``dead`` died. Run it again where that is allowed, or fail it."""
        client = connection.client
        if dead is not None:
            # Judged before any task the death killed runs again (or is forgotten).
            with self._lock:
                followed = [branch, *self._following.values()]
            self._runs.worker_died(dead, followed)
        if isinstance(branch, FollowedBatch):
            self._batch_ended(connection, plugin, pending, branch, status, error, dead,
                              results)
            return
        memory = self._killed_for_memory(branch, dead, connection)
        if memory is not None:  # it would only run out again: no retry
            results.append((branch.run, memory))
            return
        if dead is not None and self._runs.may_run_again(branch, dead):
            logger.warning("dask backend: Dask worker %s died while it had branch %r; "
                           "it runs again (run %d)", dead, branch.task.name,
                           self._runs.attempts(branch) + 1)
            pending[self.submit(client, plugin, branch)] = branch
            return
        if dead is not None:
            logger.warning("dask backend: Dask worker %s died while it ran branch %r",
                           dead, branch.task.name)
        results.append((branch.run, failed(branch, describe_failure(
            branch, status, error, dead, connection), error_type(error, dead))))

    def _batch_ended(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                     batch: FollowedBatch, status: str, error: BaseException | None,
                     dead: str | None, results: list[Finished]) -> None:
        """The task of ``batch`` ended without results: its worker died (each branch runs
        again alone, so the one that killed it is named), or it failed as a whole."""
        if dead is not None:
            logger.warning("dask backend: Dask worker %s died while it ran a batch of %d "
                           "branches; each runs again in a task of its own", dead,
                           len(batch.items))
            self._dissolve(connection.client, plugin, batch, pending)
            return
        for item in batch.items:
            results.append((item.run, failed(item, describe_failure(
                item, status, error, None, connection), error_type(error, None))))

    def _fetch(self, client: Any, futures: list[Any]) -> list[Any] | None:
        """Results of finished futures, or None if they cannot be had within FETCH_SECONDS."""
        try:
            return client.sync(client.gather, futures, callback_timeout=FETCH_SECONDS)
        except TimeoutError:
            return None
        except Exception as exc:
            if isinstance(exc, OSError) or client.status != "running":
                # The scheduler went away under the fetch: these branches stay
                # pending, and _lost fails them with every other pending one.
                logger.debug("dask backend: fetching %d results failed as the connection to "
                             "the scheduler broke (%s: %s)", len(futures), type(exc).__name__,
                             exc)
                return None
            # One result was lost; fetch them one by one to tell which.
            logger.debug("dask backend: fetching %d results at once failed (%s: %s); "
                         "fetching them one by one", len(futures), type(exc).__name__, exc)
            return [result_or_error(future) for future in futures]

    def stop_running(self, connection: Connection, branches: Iterable[Followed]) -> None:
        """Restart the workers of branches given up on, on a cluster isobranch started."""
        if connection.cluster is None:
            return  # a shared cluster's workers are restarted only for a stuck branch
        with self._lock:
            # Under the lock with their starts: each is either heard of now, or restarts
            # its worker when it arrives (``_on_event``).
            branches = list(branches)
            workers = {branch.running_on for branch in branches} - {None}
            self._stopped_unheard.add(branch.key for branch in branches
                                      if branch.running_on is None)
        if workers:
            # Expected on a stop (fail_fast, Ctrl-C, a closed stream): only a debug record.
            logger.debug("dask backend: restarting Dask worker(s) %s of branches stopped early",
                         ", ".join(sorted(w for w in workers if w is not None)))
            self._restart(connection, sorted(w for w in workers if w is not None))

    def _restart(self, connection: Connection, workers: list[str]) -> None:
        """Restart ``workers`` through their nannies without waiting for it.

        Without a nanny the restart fails quietly and the call runs on.
        """
        self._runs.restarting(workers)
        client = connection.client
        if not connection.usable:
            return  # closing: its workers end with it
        try:
            coroutine = client.scheduler.restart_workers(
                workers=workers, timeout=RESTART_TIMEOUT_SECONDS, on_error="return",
                stimulus_id=f"isobranch-stop-{time.time()}")
        except Exception as exc:
            # The client is going away under us: nothing to restart through.
            logger.debug("dask backend: cannot restart workers, the client is going away "
                         "(%s: %s)", type(exc).__name__, exc)
            return
        _start_on_client_loop(client, coroutine, "restart workers")

    def release_claims(self, connection: Connection, fan_out: FanOutWatch) -> None:
        """Let go of the claims the first runs of ``fan_out``'s tasks hold on the scheduler
        (``dask_worker.claim_first_run``), without waiting: the fan-out has let go of every
        task by now, so the scheduler runs none of them again. A claim left (a scheduler
        gone, or a start never heard of) costs the scheduler a few hundred bytes."""
        with self._lock:
            claims, fan_out.claims = fan_out.claims, []
        self._let_go(connection, claims)

    def _let_go(self, connection: Connection, claims: list[str]) -> None:
        """Release ``claims`` on the scheduler, without waiting."""
        if not claims or not connection.usable:
            return
        client = connection.client

        async def release() -> None:
            outcomes = await asyncio.gather(
                *(client.scheduler.multi_lock_release(id=claim) for claim in claims),
                return_exceptions=True)
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failures:
                logger.debug("dask backend: letting go of %d of %d task claims failed "
                             "(first: %s: %s)", len(failures), len(claims),
                             type(failures[0]).__name__, failures[0])

        _start_on_client_loop(client, release(), "let go of task claims")

    def forget(self, pending: dict[Any, Followed], futures: list[Any]) -> None:
        """Stop following the branches of ``futures`` (and take them out of ``pending``)."""
        with self._lock:
            for future in futures:
                followed = pending.pop(future, None)
                if followed is None:
                    continue
                # Let go of the future: while the client holds one, the scheduler keeps
                # its result on the worker, and recomputes it if that worker dies (a
                # finished branch would run again).
                followed.future = None
                keys = followed.keys() if isinstance(followed, FollowedBatch) else [followed.key]
                for key in keys:
                    self._following.pop(key, None)

    def close(self) -> None:
        """Take the graph off the cluster and close the client and cluster isobranch started.

        A client passed in by the caller stays open (its cluster is theirs).
        A fan-out still running fails with a ``BackendError``.
        """
        with self._ship_lock:
            self._closed = True
            connection, self._connection = self._connection, None
            plugin, self._plugin = self._plugin, None
        if connection is None:
            return
        if connection.cluster is None and plugin is not None and connection.usable:
            self._unregister(connection, plugin)
        quietly(connection.client.unsubscribe_topic, self._topic)
        if connection.cluster is not None:
            quietly(connection.client.unsubscribe_topic, MEMORY_RESTART_TOPIC)
        if connection.owns_client:
            connection.close()


def _start_on_client_loop(client: Any, coroutine: Any, what: str) -> None:
    """Start ``coroutine`` on the Dask client's event loop without waiting for it; a
    loop already gone (the client closing) only costs a debug record."""
    try:
        asyncio.run_coroutine_threadsafe(coroutine, client.loop.asyncio_loop)
    except Exception as exc:
        logger.debug("dask backend: cannot %s, the client's loop is gone (%s: %s)",
                     what, type(exc).__name__, exc)
        coroutine.close()
