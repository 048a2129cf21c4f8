"""The worker side of the Dask backend: the graph plugin, the branch task and the batch task.

Imported on Dask workers (which need isobranch installed) and lazily by the
client, because it needs ``distributed`` at import time.

Every run of a task first claims the task's key with the scheduler
(``claim_first_run``); only the first run to claim it runs branches. The
scheduler runs a key again when the worker holding its result dies while a
client still holds the key's future — which the client may do for a moment
after it reported the results — and a task whose worker died may be re-run
by a user's scheduler: such runs find the key claimed and raise
``TaskAlreadyClaimed`` without running anything.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Mapping
from typing import Any

from distributed import WorkerPlugin, get_worker
from distributed.utils import sync

from ..branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    without_unsendable_state,
)
from ..errors import BackendError, TaskAlreadyClaimed
from ..node_output import flush_node_output, line_buffer_node_output
from .dask_branches import load_failure
from .memory_limit import raise_oom_score


class GraphPlugin(WorkerPlugin):
    """Carries one compiled graph to every worker, including ones that join or restart later.

    The scheduler keeps the pickled plugin and hands it to each worker as it
    registers, so the graph crosses once per worker, never per task, and
    survives the loss of any worker. The graph is unpickled once per worker.
    With ``raise_oom_score`` each worker makes itself the kernel's first
    choice when the machine runs out of memory. Every worker makes its
    standard streams line-buffered, so a worker restarted in the middle of a
    branch (a timeout, memory) keeps every line the branch printed.
    ``by_reference`` names the modules the graph expects workers to import,
    each with why it was not carried by value: a worker that cannot load the
    graph says what to do.
    """

    def __init__(self, graph_bytes: bytes, raise_oom_score: bool = False,
                 by_reference: Mapping[str, str] | None = None) -> None:
        self.graph_bytes = graph_bytes
        self.raise_oom_score = raise_oom_score
        self.by_reference = dict(by_reference or {})
        self.graph: Any = None
        # Why this worker could not load the graph (its tasks fail with it).
        self.load_error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"graph_bytes": self.graph_bytes, "raise_oom_score": self.raise_oom_score,
                "by_reference": self.by_reference, "graph": None, "load_error": None}

    def setup(self, worker: Any) -> None:
        """Unpickle the graph on this worker; ``BackendError`` says why it cannot be."""
        line_buffer_node_output()
        if self.raise_oom_score:
            raise_oom_score()
        try:
            self.graph = pickle.loads(self.graph_bytes)
        except Exception as exc:
            # Raised to the client registering the plugin, and kept for the
            # tasks of a worker that joined later (its failed setup is only logged).
            self.load_error = (f"Dask worker {worker.address} cannot load the graph: "
                               f"{load_failure(exc, self.by_reference)}")
            raise BackendError(self.load_error) from exc

    def teardown(self, worker: Any) -> None:
        """Let the graph go when the backend closes."""
        self.graph = None


class _ProgressReporter(BranchMonitor):
    """A monitor that tells the client which node the branch has entered.

    The report is sent without waiting; the client uses it to name the node
    of a branch it has to give up on.
    """

    def __init__(self, worker: Any, topic: str, key: str, first_node: str) -> None:
        self._worker, self._topic, self._key = worker, topic, key
        # The client knows a branch starts at the node it is named after.
        self._node: str | None = first_node
        super().__init__()

    @property  # type: ignore[override]
    def node(self) -> str | None:
        return self._node

    @node.setter
    def node(self, name: str | None) -> None:
        if name is not None and name != self._node:
            self._worker.log_event(self._topic, {"kind": "node", "key": self._key, "node": name})
        self._node = name if name is not None else self._node


def _loaded_graph(worker: Any, plugin: str) -> Any:
    """The graph ``plugin`` carries on this worker; ``BackendError`` says why there is none."""
    graph_plugin = worker.plugins.get(plugin)
    if graph_plugin is not None and graph_plugin.load_error is not None:
        raise BackendError(graph_plugin.load_error)
    if graph_plugin is None or graph_plugin.graph is None:
        raise BackendError(f"Dask worker {worker.address} has no graph {plugin!r} "
                           f"(the backend was closed?)")
    return graph_plugin.graph


def claim_first_run(worker: Any, key: str) -> str | None:
    """Claim the task ``key`` for this run: the claim's id if no run of the key claimed it
    before, else None (and this run must run nothing).

    One round trip: the scheduler's multi-lock ``acquire`` without waiting is a test and
    set on its one event loop, so of two runs of a key exactly one holds the claim, also
    when they race. A claim is never let go by its run (a run whose worker dies keeps
    it, so no later run of that key runs anything); the client lets go of its fan-out's
    claims when the fan-out ends.
    """
    claim = f"{key}@{uuid.uuid4().hex}"
    first = sync(worker.loop, worker.scheduler.multi_lock_acquire, locks=[key], id=claim,
                 timeout=0, num_locks=1)
    return claim if first else None


def run_batch_on_worker(plugin: str, payloads: bytes, topic: str, key: str,
                        item_keys: list[str], report_starts: bool
                        ) -> tuple[list[ParallelFlowResult], float]:
    """The Dask task of a batch: several branches, one after another, on this worker.

    ``payloads`` is the branches' payloads as one pickle (``pack_payloads``).
    Returns every result in order and the seconds the batch took here (the
    client sizes its next batches from it). The batch's start is reported
    without waiting (where it runs); with ``report_starts`` (the branches
    have a ``branch_timeout``) so is each branch's, so the client counts each
    one's deadline from its own start. Node changes are reported under
    ``item_keys``. A run that is not the first of ``key`` runs nothing and raises
    ``TaskAlreadyClaimed``.
    """
    worker = get_worker()
    graph = _loaded_graph(worker, plugin)
    claim = claim_first_run(worker, key)
    if claim is None:
        raise TaskAlreadyClaimed(key)
    # Not waited for, unlike a single branch's: whether a batch started before its worker
    # died changes nothing (its branches all run again alone), and the claim is the one
    # round trip to the scheduler a batch makes.
    worker.log_event(topic, {"kind": "start", "key": key, "worker": worker.address,
                             "threads": worker.state.nthreads, "claim": claim})
    began = time.monotonic()
    results = []
    try:
        for payload, item_key in zip(pickle.loads(payloads), item_keys, strict=True):
            task = BranchTask(graph=graph, **payload)
            if report_starts:
                worker.log_event(topic, {"kind": "item", "key": item_key})
            result = graph.run_branch(task, monitor=_ProgressReporter(worker, topic, item_key,
                                                                      task.start))
            result.worker = worker.address
            results.append(without_unsendable_state(result))
    finally:
        flush_node_output()
    return results, time.monotonic() - began


def run_on_worker(plugin: str, payload: dict[str, Any], topic: str, key: str
                  ) -> ParallelFlowResult:
    """The Dask task: one branch of the graph that ``plugin`` carries, on this worker.

    The start is confirmed with the scheduler before the branch runs (one
    round trip), so the client knows where and since when it runs even if a
    call in it then holds the GIL; a branch queued on a worker that dies is
    told apart from one that ran there. A run that is not the first of ``key`` runs
    nothing and raises ``TaskAlreadyClaimed``.
    """
    worker = get_worker()
    graph = _loaded_graph(worker, plugin)
    claim = claim_first_run(worker, key)
    if claim is None:
        raise TaskAlreadyClaimed(key)
    sync(worker.loop, worker.scheduler.log_event, topic=topic,
         msg={"kind": "start", "key": key, "worker": worker.address,
              "threads": worker.state.nthreads, "claim": claim})
    task = BranchTask(graph=graph, **payload)
    try:
        result = graph.run_branch(task, monitor=_ProgressReporter(worker, topic, key, task.start))
    finally:
        # Out before the result: a worker ended later (restarted, or its
        # nanny killed at close) would drop it.
        flush_node_output()
    result.worker = worker.address
    return without_unsendable_state(result)
