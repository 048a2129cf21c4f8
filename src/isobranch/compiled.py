"""CompiledGraph: a validated graph that runs, streams, resumes, and owns its worker pools.

``StateGraph.compile`` (graph.py) builds one; the step loop it drives is
runner.py.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import async_api, drawing
from .branch import BranchLimits
from .cancellation import CancelSignal
from .checkpoint.runs import begin_run, reopen_run
from .checkpoint.store import RunStatus, SqliteCheckpointer
from .conditions import Condition
from .context import ExecutionContext
from .errors import GraphError, GraphExecutionError, RunCancelled, StateCopyError
from .fanout import FanOut
from .isolation import memory_limit
from .isolation.base import IsolationBackend, available_backends, create_backend
from .nodes import Node
from .retry import RetryPolicy, as_policy
from .runner import run_steps
from .schema import StateSchema
from .statecopy import StateSnapshot

CONFIG_KEYS = ("isolation", "max_workers", "branch_timeout", "fail_fast", "max_concurrency",
               "branch_retry")


@dataclass
class Routes:
    """Where to go after a node: a router, conditional edges, a default edge."""

    router: Callable[[dict], Any] | None = None
    mapping: dict[Any, str] | None = None
    conditional: list[tuple[Condition, str]] = field(default_factory=list)
    default: str | None = None


def limit_problems(*, integers: bool = False, **limits: Any) -> list[str]:
    problems = []
    for key, value in limits.items():
        if value is None:
            continue
        if integers:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{key} must be a positive integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{key} must be a positive number, got {value!r}")
    return problems


class CompiledGraph:
    """A validated graph, ready to run; owns the worker pools of its backends.

    Pools are created on first use, reused across invocations, and released
    by ``close()`` (also on ``with`` exit, garbage collection and interpreter
    exit).
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
                 checkpointer: SqliteCheckpointer | None = None) -> None:
        self.nodes = nodes
        # The retry policy of each node that has one.
        self.node_retries = node_retries or {}
        self.branch_retry = branch_retry
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
        self._fingerprint: dict[str, str] | None = None  # checkpoint.fingerprint fills it
        self._init_pools()

    def _init_pools(self) -> None:
        self._backends: dict[tuple[str, int | None], IsolationBackend] = {}
        self._pool_lock = threading.Lock()
        self._closed = False
        # The close() signal of every run in progress: close() sets them.
        self._runs: set[CancelSignal] = set()
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
        ``GraphError``). Raises ``GraphExecutionError`` naming the node and
        branch that failed (and the ``run_id``).
        """
        return self._final_state(state, config)

    def _final_state(self, state: dict | None, config: dict | None,
                     cancel: CancelSignal | None = None) -> dict:
        return _last_state(self._events(state, config, snapshots=False, cancel=cancel))

    def resume(self, run_id: str, config: dict | None = None, *, force: bool = False,
               _cancel: CancelSignal | None = None) -> dict:
        """Finish the recorded run ``run_id`` and return its final state.

        It continues after the run's last recorded main-path step; a fan-out
        that was under way runs only the branches with no recorded success.
        A run that succeeded returns its final state and runs nothing. A
        graph changed since the run started (nodes, edges, code) is a
        ``GraphError`` saying what changed, unless ``force=True``.
        """
        if self.checkpointer is None:
            raise GraphError("resume() needs a checkpointer: compile(checkpointer="
                             "SqliteCheckpointer(path)) or YAML settings.checkpoint")
        return _last_state(self._events(None, config, snapshots=False, resume=run_id,
                                        force=force, cancel=_cancel))

    def resume_stream(self, run_id: str, config: dict | None = None, *, force: bool = False
                      ) -> Iterator[dict[str, Any]]:
        """``resume``, yielding the events of ``stream`` for what runs (``run`` first)."""
        if self.checkpointer is None:
            raise GraphError("resume_stream() needs a checkpointer: compile(checkpointer="
                             "SqliteCheckpointer(path)) or YAML settings.checkpoint")
        return self._events(None, config, snapshots=True, resume=run_id, force=force)

    def stream(self, state: dict | None = None, config: dict | None = None
               ) -> Iterator[dict[str, Any]]:
        """Run the graph, yielding events as they happen.

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
        """
        return self._events(state, config, snapshots=True)

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
            self, lambda cancel: self._final_state(state, config, cancel))

    def astream(self, state: dict | None = None, config: dict | None = None
                ) -> AsyncIterator[dict[str, Any]]:
        """``stream`` as an async iterator; the run goes on in a thread of the run pool.

        Events are the same as ``stream``'s. Leaving the ``async for``
        early (``break``, an exception, cancellation) stops the run as a
        cancellation does, once the iterator is closed: use
        ``contextlib.aclosing`` to close it at once.
        """
        return async_api.stream_off_loop(
            self, lambda cancel: self._events(state, config, snapshots=True, cancel=cancel))

    async def aresume(self, run_id: str, **options: Any) -> dict:
        """``resume(run_id, ...)`` without blocking the event loop (needs a checkpointer).

        Cancelling it stops the resumed run like ``ainvoke``.
        """
        resume = getattr(self, "resume", None)
        if resume is None:
            raise GraphError("this compiled graph cannot resume runs: resume() is not available")
        return await async_api.run_off_loop(
            self, lambda cancel: async_api.call_with_cancel(resume, cancel, run_id, **options))

    def _events(self, state: dict | None, config: dict | None, *, snapshots: bool,
                cancel: CancelSignal | None = None, resume: str | None = None,
                force: bool = False) -> Iterator[dict[str, Any]]:
        config = dict(config or {})
        run_id = config.pop("run_id", None)
        settings = self._resolve(config)
        if (run_id is not None or resume is not None) and self.checkpointer is None:
            raise GraphError("config: run_id needs a checkpointer (compile(checkpointer=...) "
                             "or YAML settings.checkpoint)")
        if resume is not None and run_id is not None:
            raise GraphError("config: run_id cannot be given to resume(); it resumes the run "
                             "it names")
        if resume is None:
            working = self._input_copy(state)
        backend = self._backend(settings["isolation"], settings["max_workers"])
        recorder, point = None, None
        if resume is not None:
            assert self.checkpointer is not None
            reopened = reopen_run(self.checkpointer, self, resume, force=force)
            if reopened.done:  # it succeeded: its final state, and nothing runs
                yield {"type": "run", "run_id": resume}
                yield {"type": "final", "state": reopened.state}
                return
            recorder, working, point = reopened.recorder, reopened.state, reopened.point
        elif self.checkpointer is not None:
            recorder = begin_run(self.checkpointer, self, working, run_id)
        stop = CancelSignal("the graph was closed while the run was in progress", RunCancelled)
        context = ExecutionContext(
            self, backend=backend, max_workers=settings["max_workers"],
            max_concurrency=settings["max_concurrency"], stop=stop,
            fan_out_limits=BranchLimits(branch_timeout=settings["branch_timeout"],
                                        fail_fast=settings["fail_fast"],
                                        branch_max_memory=self.branch_max_memory,
                                        branch_retry=settings["branch_retry"]),
            cancel=cancel, recorder=recorder)
        with self._pool_lock:
            self._runs.add(stop)
        try:
            if recorder is not None:
                yield {"type": "run", "run_id": recorder.run_id}
            # invoke() needs no per-branch events; stream() reports them.
            yield from run_steps(self, working, context, start=self.entry, snapshots=snapshots,
                                 branch_events=snapshots, resume=point)
        except GraphExecutionError as exc:
            if recorder is not None:
                exc.run_id = recorder.run_id
                _record_end(recorder, RunStatus.FAILED, exc)
            raise
        except Exception as exc:
            if recorder is not None:
                _record_end(recorder, RunStatus.FAILED, exc)
            raise
        except BaseException as exc:  # Ctrl-C, cancellation, a consumer that stopped reading
            if recorder is not None:
                _record_end(recorder, RunStatus.INTERRUPTED, exc)
            raise
        finally:
            with self._pool_lock:
                self._runs.discard(stop)
            context.close()
        if recorder is not None:
            recorder.finished(RunStatus.SUCCEEDED, working)
        yield {"type": "final", "state": working}

    def _input_copy(self, state: dict | None) -> dict:
        if state is None:
            state = {}
        if not isinstance(state, dict):
            raise GraphError(f"the input state must be a dict, got {type(state).__name__}")
        try:
            working = StateSnapshot(state).copy()
        except StateCopyError as exc:
            raise GraphError(f"the input state cannot be copied: {exc}") from exc
        if mismatched := self.schema.check_input(working):
            raise GraphError(problems=[f"the input state: {p}" for p in mismatched])
        return working

    def _resolve(self, config: dict | None) -> dict[str, Any]:
        settings = {"isolation": self.isolation, "max_workers": self.max_workers,
                    "branch_timeout": self.branch_timeout, "fail_fast": self.fail_fast,
                    "max_concurrency": self.max_concurrency, "branch_retry": self.branch_retry}
        if not config:
            return settings
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise GraphError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join((*CONFIG_KEYS, 'run_id'))}")
        settings.update(config)
        problems = limit_problems(max_workers=settings["max_workers"],
                                   branch_timeout=settings["branch_timeout"])
        problems += limit_problems(max_concurrency=settings["max_concurrency"], integers=True)
        try:
            settings["branch_retry"] = as_policy(settings["branch_retry"], "branch_retry")
        except ValueError as exc:
            problems.append(f"branch_retry: {exc}")
        if settings["isolation"] not in available_backends():
            problems.append(f"unknown isolation backend {settings['isolation']!r}; available: "
                            f"{', '.join(available_backends())}")
        if problems:
            raise GraphError("config: " + "; ".join(problems))
        return settings

    def _adopt_backend(self, isolation: str, backend: IsolationBackend,
                       max_workers: int | None) -> None:
        self._backends[(isolation, max_workers)] = backend

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
                refused = (memory_limit.refusal(isolation, backend, self.branch_max_memory)
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
            runs = list(self._runs)
        for stop in runs:
            stop.cancel()
        self._finalizer()
        if self.owns_checkpointer and self.checkpointer is not None:
            self.checkpointer.close()

    def __enter__(self) -> CompiledGraph:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _last_state(events: Iterator[dict[str, Any]]) -> dict:
    final: dict = {}
    for event in events:
        if event["type"] == "final":
            final = event["state"]
    return final


def _record_end(recorder: Any, status: RunStatus, exc: BaseException) -> None:
    """Record a run's failed or interrupted end without hiding the exception that ended it."""
    try:
        recorder.finished(status, error=f"{type(exc).__name__}: {exc}")
    except Exception as record_error:
        exc.add_note(f"recording the end of run {recorder.run_id!r} failed too: "
                     f"{type(record_error).__name__}: {record_error}")


def _close_backends(backends: dict[Any, IsolationBackend],
                    run_threads: async_api.RunThreads | None = None) -> None:
    while backends:
        _, backend = backends.popitem()
        backend.close()
    if run_threads is not None:  # after the backends: a run still going then fails and ends
        run_threads.close()
