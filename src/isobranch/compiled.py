"""CompiledGraph: a validated graph that runs, streams, resumes, and owns its worker pools.

``StateGraph.compile`` (graph.py) builds one. This is the public surface:
each call is one run, which run.py drives around the step loop (runner.py).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

from . import async_api, drawing, run_history
from .branch_run import run_branch
from .cancellation import CancelSignal
from .checkpoint.answering import NO_ANSWER
from .checkpoint.fingerprint import graph_fingerprint
from .checkpoint.store import SqliteCheckpointer
from .errors import GraphError, GraphExecutionError
from .fanout import FanOut
from .isolation import memory_limit
from .isolation.base import IsolationBackend
from .isolation.registry import create_backend
from .node_memo import NO_MEMOS, NodeMemos
from .nodes import Node
from .retry import RetryPolicy
from .routes import Routes
from .run import ActiveRuns, last_state, run_events
from .schema import StateSchema
from .stream_modes import StreamMode, stream_mode
from .subgraph import SubgraphNode


class CompiledGraph:
    """A validated graph, ready to run; owns the worker pools of its backends.

    Pools are created on first use, reused across invocations, and released
    by ``close()`` (also on ``with`` exit, garbage collection and interpreter
    exit). ``backend`` is the one ``compile`` made for ``isolation`` and
    ``max_workers``; the graph owns it from then on.
    """

    def __init__(self, *, nodes: dict[str, Node], routes: dict[str, Routes],
                 fan_outs: dict[str, FanOut], entry: str, isolation: str,
                 max_workers: int | None, branch_timeout: float | None, fail_fast: bool,
                 lua_timeout: float | None, lua_max_memory: int | None, variables: dict,
                 max_steps: int, backend_options: dict[str, Any], name: str | None,
                 branch_max_memory: int | None = None,
                 max_concurrency: int | None = None,
                 node_retries: dict[str, RetryPolicy] | None = None,
                 branch_retry: RetryPolicy | None = None,
                 schema: StateSchema | None = None,
                 checkpointer: SqliteCheckpointer | None = None,
                 backend: IsolationBackend | None = None,
                 interrupt_before: Iterable[str] = (),
                 interrupt_after: Iterable[str] = (),
                 memos: NodeMemos = NO_MEMOS) -> None:
        self.nodes = nodes
        # Breakpoints: the main path pauses before / after these nodes.
        self.interrupt_before = frozenset(interrupt_before)
        self.interrupt_after = frozenset(interrupt_after)
        # The cached and recorded nodes, and the cache (node_memo.py).
        self.memos = memos
        # The retry policy of each node that has one.
        self.node_retries = node_retries or {}
        self.branch_retry = branch_retry
        # The nodes the step loop just runs: no cache or recording, no retry policy, not
        # a subgraph (it takes one short path for these, a branch's nodes most often).
        unadorned = [name for name in nodes
                     if name not in memos.nodes and name not in self.node_retries]
        self.plain_nodes = frozenset(
            name for name in unadorned if not isinstance(nodes[name], SubgraphNode))
        # The subgraph nodes it runs as directly: no cache or recording, no retry policy
        # (a map whose body is a subgraph meets one per item).
        self.plain_subgraphs = frozenset(
            name for name in unadorned if isinstance(nodes[name], SubgraphNode))
        # Every node is plain and none fans out: run as a subgraph node, its steps take
        # the step loop's shortest path.
        self.all_plain = len(self.plain_nodes) == len(nodes) and not fan_outs
        # Declared types and reducers; every update merges through it.
        self.schema = schema if schema is not None else StateSchema()
        self._routes = routes
        self._fan_outs = fan_outs
        self.entry = entry
        self.isolation = isolation
        self.max_workers = max_workers
        self.branch_timeout = branch_timeout
        self.fail_fast = fail_fast
        self.max_concurrency = max_concurrency
        self.lua_timeout = lua_timeout
        self.lua_max_memory = lua_max_memory
        self.variables = variables
        self.max_steps = max_steps
        self.backend_options = backend_options
        # Options of other backends by name (a YAML document's sections such as
        # settings.parallel.process), for a run whose config picks one of them.
        self.other_backends_options: dict[str, dict[str, Any]] = {}
        self.name = name
        self.branch_max_memory = branch_max_memory
        self.checkpointer = checkpointer
        # A checkpointer made from YAML settings belongs to the graph and closes with it.
        self.owns_checkpointer = False
        self._fingerprint: dict[str, str] | None = None  # fingerprint() fills it
        self._init_pools()
        if backend is not None:
            self._backends[(isolation, max_workers)] = backend

    def _init_pools(self) -> None:
        self._backends: dict[tuple[str, int | None], IsolationBackend] = {}
        self._pool_lock = threading.Lock()
        self._closed = False
        # The close() signal of every run in progress: close() sets them.
        self._runs = ActiveRuns()
        # Threads that run ainvoke/astream calls, started on first use.
        self._run_threads = async_api.RunThreads()
        self._finalizer = weakref.finalize(self, _close_backends, self._backends,
                                           self._run_threads)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for private in ("_backends", "_pool_lock", "_finalizer", "_closed", "_run_threads",
                        "_runs"):
            state.pop(private, None)
        # Branches never create the graph's backends; these options may hold live objects.
        state["other_backends_options"] = {}
        state["checkpointer"] = None  # branches never record; workers need no database
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_pools()

    def fan_out_of(self, node: str) -> FanOut | None:
        """How ``node`` fans out (a ``StaticFanOut`` or a ``MapFanOut``), or None."""
        return self._fan_outs.get(node)

    @property
    def fan_outs(self) -> dict[str, FanOut]:
        """Every fan-out by source node."""
        return dict(self._fan_outs)

    def routes_of(self, node: str) -> Routes:
        """The outgoing routes of ``node``."""
        return self._routes[node]

    def draw_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (``drawing.py`` says what is drawn and how)."""
        return drawing.draw_mermaid(self)

    def draw_dot(self) -> str:
        """The graph as a Graphviz DOT digraph; ``dot -Tsvg`` renders it."""
        return drawing.draw_dot(self)

    def invoke(self, state: dict | None = None, config: dict | None = None) -> dict:
        """Run the graph on a copy of ``state`` and return the final state.

        ``config`` may override ``isolation``, ``max_workers``,
        ``branch_timeout``, ``fail_fast`` and ``max_concurrency``, and with a
        checkpointer give the new run's ``run_id`` (one that exists is a
        ``GraphError``); ``replay`` is the run's tape of recorded nodes
        (``Cassette.tape(case)``, docs/regression-testing.md). Raises
        ``GraphExecutionError`` naming the node and branch that failed (and
        the ``run_id``).
        """
        return self._final_state(state, config)

    def _final_state(self, state: dict | None, config: dict | None,
                     cancel: CancelSignal | None = None) -> dict:
        return last_state(self._events(state, config, snapshots=False, cancel=cancel))

    def resume(self, run_id: str, config: dict | None = None, *, force: bool = False,
               answer: Any = NO_ANSWER, answers: Mapping[str, Any] | None = None,
               _cancel: CancelSignal | None = None) -> dict:
        """Finish the recorded run ``run_id`` and return its final state.

        It continues after the run's last recorded main-path step; a fan-out
        that was under way runs only the branches with no recorded success.
        A run that succeeded returns its final state and runs nothing. A
        graph changed since the run started (nodes, edges, code) is a
        ``GraphError`` saying what changed, unless ``force=True``.

        A run that paused (``"__interrupt__"``) is answered here: ``answer``
        answers its one pending interrupt, ``answers={id: value}`` any of
        them; with neither it goes on past a breakpoint. The interrupted node
        runs again from its start, its k-th ``interrupt()`` call returning the
        k-th answer given to it; paused branches continue from the node they
        paused in. It may pause again (``"__interrupt__"`` once more).
        """
        if self.checkpointer is None:
            raise GraphError("resume() needs a checkpointer: compile(checkpointer="
                             "SqliteCheckpointer(path)) or YAML settings.checkpoint")
        return last_state(self._events(None, config, snapshots=False, resume=run_id,
                                       force=force, cancel=_cancel, answer=answer,
                                       answers=answers))

    def resume_stream(self, run_id: str, config: dict | None = None, *, force: bool = False,
                      mode: StreamMode | str = StreamMode.EVENTS, answer: Any = NO_ANSWER,
                      answers: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """``resume``, yielding the events of ``stream`` (in ``mode``) for what runs
        (``run`` first)."""
        mode = stream_mode(mode)
        if self.checkpointer is None:
            raise GraphError("resume_stream() needs a checkpointer: compile(checkpointer="
                             "SqliteCheckpointer(path)) or YAML settings.checkpoint")
        return self._events(None, config, snapshots=True, resume=run_id, force=force, mode=mode,
                            answer=answer, answers=answers)

    def stream(self, state: dict | None = None, config: dict | None = None,
               mode: StreamMode | str = StreamMode.EVENTS) -> Iterator[dict[str, Any]]:
        """Run the graph, yielding events as they happen (``mode="events"``, the default).

        ``{"type": "node", "node", "state"}`` after each node of the main
        path, ``{"type": "branch", "fan_out", "fan_in", "branch", "index",
        "success", "error_type", "timed_out", "duration_ms", "attempts",
        "done", "total"}`` as each branch of a main-path fan-out finishes
        (completion order), ``{"type": "parallel", "fan_in", "branches"}``
        after each fan-out, and ``{"type": "final", "state"}`` last. With
        retry policies, ``{"type": "node_retry", "node", "attempt",
        "max_attempts", "error", "error_type", "retry_in"}`` before a
        main-path node runs again, and ``{"type": "branch_retry", ...}``
        (``"attempt"``, ``"max_attempts"``, ``"error"``, ``"retry_in"``
        besides the ``branch`` event's fields but ``attempts``) for each
        branch attempt that will run again. With a checkpointer the first event
        is ``{"type": "run", "run_id"}``.

        ``mode="updates"`` keeps every event small whatever the size of the
        state or the number of branches: a node event is ``{"type": "node",
        "node", "update"}`` (what the node returned), a ``parallel`` event
        ``{"type": "parallel", "fan_out", "fan_in", "total", "succeeded",
        "failed", "failed_branches"}`` (at most 10 names), and the last event
        ``{"type": "final"}`` carries no state. ``mode="values"`` yields only
        the node events (each with a copy of the whole state) and ``final``.
        An unknown mode is a ``ConfigError`` (a ``ValueError``) at once.
        """
        mode = stream_mode(mode)
        return self._events(state, config, snapshots=True, mode=mode)

    async def ainvoke(self, state: dict | None = None, config: dict | None = None) -> dict:
        """``invoke`` without blocking the event loop; cancelling the awaiting task stops the run.

        The run goes on in a thread of this graph's run pool. Cancellation
        (``task.cancel()``, ``asyncio.timeout``, ``asyncio.wait_for``) stops
        it: queued branches never start, running ones are stopped (thread
        and inline: at once in Lua, at the next node boundary in Python;
        process: their workers are killed; dask: their tasks are cancelled),
        and ``CancelledError`` is raised once they have (see docs/async.md).
        """
        return await async_api.run_off_loop(
            self._run_threads, lambda cancel: self._final_state(state, config, cancel))

    def astream(self, state: dict | None = None, config: dict | None = None,
                mode: StreamMode | str = StreamMode.EVENTS) -> AsyncIterator[dict[str, Any]]:
        """``stream`` as an async iterator; the run goes on in a thread of the run pool.

        Events are the same as ``stream``'s in the same ``mode``. Leaving the ``async for``
        early (``break``, an exception, cancellation) stops the run as a
        cancellation does, once the iterator is closed: use
        ``contextlib.aclosing`` to close it at once.
        """
        mode = stream_mode(mode)
        return async_api.stream_off_loop(
            self._run_threads,
            lambda cancel: self._events(state, config, snapshots=True, cancel=cancel, mode=mode))

    async def aresume(self, run_id: str, **options: Any) -> dict:
        """``resume(run_id, ...)`` without blocking the event loop (needs a checkpointer).

        Cancelling it stops the resumed run like ``ainvoke``.
        """
        resume = getattr(self, "resume", None)
        if resume is None:
            raise GraphError("this compiled graph cannot resume runs: resume() is not available")
        return await async_api.run_off_loop(
            self._run_threads,
            lambda cancel: async_api.call_with_cancel(resume, cancel, run_id, **options))

    def _events(self, state: dict | None, config: dict | None, *, snapshots: bool,
                cancel: CancelSignal | None = None, resume: str | None = None,
                force: bool = False, mode: StreamMode = StreamMode.EVENTS,
                answer: Any = NO_ANSWER, answers: Mapping[str, Any] | None = None
                ) -> Iterator[dict[str, Any]]:
        return run_events(self, state, config, backend_for=self._backend, active=self._runs,
                          snapshots=snapshots, cancel=cancel, resume=resume, force=force,
                          mode=mode, answer=answer, answers=answers)

    def get_state(self, run_id: str) -> run_history.RunState:
        """The recorded run ``run_id`` as it stands: ``values``, ``status``, ``next`` (the
        nodes a resume runs next), pending ``interrupts``, ``step`` (needs a checkpointer).

        An unknown run is a ``GraphError`` naming it and the database.
        """
        return run_history.get_state(self, run_id)

    def history(self, run_id: str) -> list[run_history.StepRecord]:
        """The recorded steps of run ``run_id``, oldest first, each ``(step, node, state,
        time)``; step 0 is the run's input (needs a checkpointer)."""
        return run_history.history(self, run_id)

    def fork(self, run_id: str, step: int, update: dict | None = None,
             new_run_id: str | None = None) -> str:
        """Record a new run that starts from the state after ``step`` of run ``run_id`` with
        ``update`` merged in (as if that step's node returned it, reducers applying); its id.

        Continue it with ``resume``; the original run never changes. A step out
        of range is a ``GraphError`` naming the range; a ``new_run_id`` that
        exists, a ``RunExistsError``.
        """
        return run_history.fork(self, run_id, step, update, new_run_id)

    def fingerprint(self) -> dict[str, str]:
        """``{part: digest}`` for every node and edge: what a checkpointed run records.

        ``resume`` compares it with the recorded one to name what changed
        (parts read like ``node 'score'``, ``edge a->b``). Computed once: a
        compiled graph never changes.
        """
        if self._fingerprint is None:
            self._fingerprint = graph_fingerprint(self)
        return dict(self._fingerprint)

    # How a backend runs one branch of this graph, handed the graph, so no backend imports
    # the step loop: ``branch_run.run_branch`` itself (the task holds this graph), not a
    # method calling it, which would cost every branch a call.
    run_branch = staticmethod(run_branch)

    def _backend(self, isolation: str, max_workers: int | None) -> IsolationBackend:
        key = (isolation, max_workers)
        with self._pool_lock:
            if self._closed:
                raise GraphExecutionError("this compiled graph is closed")
            backend = self._backends.get(key)
            if backend is None:
                options = (self.backend_options if isolation == self.isolation
                           else self.other_backends_options.get(isolation, {}))
                try:
                    backend = create_backend(isolation, max_workers=max_workers, **options)
                except ValueError as exc:  # an option's value the backend refuses
                    raise GraphError(f"config: isolation backend {isolation!r}: {exc}") from exc
                refused = (memory_limit.refusal(backend, self.branch_max_memory)
                           if self.branch_max_memory is not None else None)
                if refused:
                    backend.close()
                    raise GraphError(f"config: {refused}")
                self._backends[key] = backend
            return backend

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (a closed graph cannot run)."""
        return self._closed

    def close(self) -> None:
        """Release every worker pool this graph owns. Safe to call twice.

        Runs in progress stop: a retry's backoff ends at once.
        """
        with self._pool_lock:
            self._closed = True
        self._runs.stop_all()
        self._finalizer()
        if self.owns_checkpointer and self.checkpointer is not None:
            self.checkpointer.close()
        if self.memos.cache is not None:  # this process's connection; a later use reopens it
            self.memos.cache.close()

    def __enter__(self) -> CompiledGraph:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _close_backends(backends: dict[Any, IsolationBackend],
                    run_threads: async_api.RunThreads | None = None) -> None:
    while backends:
        _, backend = backends.popitem()
        backend.close()
    if run_threads is not None:  # after the backends: a run still going then fails and ends
        run_threads.close()
