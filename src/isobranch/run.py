"""One run of a compiled graph: its config, its checkpoint record, its context, its events.

Every ``invoke``, ``stream`` and ``resume`` of a ``CompiledGraph``
(compiled.py, the public surface) is one run, driven here around the step
loop (runner.py): the call's config checked against the graph's own
settings, the run recorded (begun, or reopened to resume) and ended in the
checkpointer, the main path's ``ExecutionContext``, and the events, ending
with ``final``. The graph hands in what it owns — its backends (by
``backend_for``) and its runs in progress (``ActiveRuns``) — so this module
never imports compiled.py.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from .branch import BranchLimits
from .cancellation import CancelSignal
from .checkpoint.answering import NO_ANSWER
from .checkpoint.recorder import RunRecorder
from .checkpoint.runs import begin_run, paused_state, reopen_run
from .checkpoint.store import RunStatus, SqliteCheckpointer
from .context import ExecutionContext
from .errors import GraphError, GraphExecutionError, NodePaused, RunCancelled, StateCopyError
from .interrupts import NO_INTERRUPTS, Interrupt, InterruptSettings
from .isolation.base import IsolationBackend
from .isolation.registry import available_backends
from .replay import Tape
from .retry import RetryPolicy, as_policy
from .runner import run_steps
from .schema import StateSchema
from .statecopy import StateSnapshot
from .stream_modes import VALUES_EVENT_TYPES, StreamMode
from .subgraph import node_paths
from .tracing import run_tracing

# What a call's config may override (besides ``run_id``, which names a checkpointed run,
# and ``replay``, the run's tape of recorded nodes).
CONFIG_KEYS = ("isolation", "max_workers", "branch_timeout", "fail_fast", "max_concurrency",
               "branch_retry")


class RunnableGraph(Protocol):
    """What a run reads of the graph it runs; a ``CompiledGraph`` is one.

    Described here rather than imported, since compiled.py imports this
    module. The runner and the context are handed the same object.
    """

    entry: str
    name: str | None
    nodes: Mapping[str, Any]
    schema: StateSchema
    checkpointer: SqliteCheckpointer | None
    branch_max_memory: int | None
    # The settings a call's config may override (CONFIG_KEYS).
    isolation: str
    max_workers: int | None
    branch_timeout: float | None
    fail_fast: bool
    max_concurrency: int | None
    branch_retry: RetryPolicy | None
    # The main path's breakpoints (compile(interrupt_before=..., interrupt_after=...)).
    interrupt_before: frozenset[str]
    interrupt_after: frozenset[str]

    def fingerprint(self) -> dict[str, str]:
        """``{part: digest}`` of every node and edge, as a checkpointed run records it."""
        ...


class ActiveRuns:
    """The stop signals of one graph's runs in progress; ``stop_all`` ends every one.

    ``CompiledGraph.close()`` calls ``stop_all``: a retry's backoff in a run
    then ends at once, and the run fails naming what waited.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: set[CancelSignal] = set()

    def add(self, stop: CancelSignal) -> None:
        """A run started; ``stop`` is the signal it listens to."""
        with self._lock:
            self._stops.add(stop)

    def discard(self, stop: CancelSignal) -> None:
        """The run listening to ``stop`` ended."""
        with self._lock:
            self._stops.discard(stop)

    def stop_all(self) -> None:
        """Set the stop signal of every run in progress."""
        with self._lock:
            stops = list(self._stops)
        for stop in stops:
            stop.cancel()


def limit_problems(*, integers: bool = False, **limits: Any) -> list[str]:
    """A message for each limit that is not a positive number (``integers``: integer).

    None means no limit and is always fine.
    """
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


def run_events(graph: RunnableGraph, state: dict | None, config: dict | None, *,
               backend_for: Callable[[str, int | None], IsolationBackend], active: ActiveRuns,
               snapshots: bool, cancel: CancelSignal | None = None, resume: str | None = None,
               force: bool = False, mode: StreamMode = StreamMode.EVENTS,
               answer: Any = NO_ANSWER, answers: Mapping[str, Any] | None = None
               ) -> Iterator[dict[str, Any]]:
    """The events of one run of ``graph``: ``stream``'s, ending with ``final``.

    A new run starts from a copy of ``state``; ``resume`` names a recorded
    run to finish instead (``force``: even if the graph changed since).
    ``backend_for(isolation, max_workers)`` is the graph's backend for the
    main path's fan-outs; the run's stop signal is in ``active`` while it
    runs. ``snapshots`` makes node events carry a copy of the state and adds
    the ``branch`` events. ``mode`` shapes a stream's events
    (stream_modes.py): ``updates`` carries no state, not even in ``final``;
    ``values`` keeps the node events and ``final``. A run that pauses
    (``interrupt()``, a breakpoint) ends with an ``interrupt`` event instead
    of ``final``, its state carrying ``"__interrupt__"``; ``answer``/``answers``
    answer what a resumed run waits for. Nothing happens before
    the first event is asked for. Raises ``GraphError`` for a bad call (config, input state, run id)
    and ``GraphExecutionError`` for a failed run (with its ``run_id`` when
    recorded); the recorded run ends failed or interrupted either way.
    """
    config = dict(config or {})
    run_id = config.pop("run_id", None)
    replay = config.pop("replay", None)
    if replay is not None and not isinstance(replay, Tape):
        raise GraphError(f"config: replay must be a Tape (Cassette.tape(case)), got "
                         f"{type(replay).__name__}")
    settings = resolve_config(graph, config)
    if (run_id is not None or resume is not None) and graph.checkpointer is None:
        raise GraphError("config: run_id needs a checkpointer (compile(checkpointer=...) "
                         "or YAML settings.checkpoint)")
    if resume is not None and run_id is not None:
        raise GraphError("config: run_id cannot be given to resume(); it resumes the run "
                         "it names")
    if resume is None:
        working = input_copy(graph.schema, state)
    backend = backend_for(settings["isolation"], settings["max_workers"])
    recorder, point = None, None
    if resume is not None:
        assert graph.checkpointer is not None
        reopened = reopen_run(graph.checkpointer, resume, fingerprint=graph.fingerprint(),
                              nodes=set(node_paths(graph)), force=force, answer=answer,
                              answers=answers)
        if reopened.done:  # it succeeded: its final state, and nothing runs
            yield {"type": "run", "run_id": resume}
            yield _final_event(reopened.state, mode)
            return
        recorder, working, point = reopened.recorder, reopened.state, reopened.point
        interrupts = InterruptSettings(True, reopened.answers, graph.interrupt_before,
                                       graph.interrupt_after, reopened.passed)
    elif graph.checkpointer is not None:
        recorder = begin_run(graph.checkpointer, working, run_id, graph_name=graph.name,
                             fingerprint=graph.fingerprint())
    if recorder is not None and resume is None:
        interrupts = InterruptSettings(True, {}, graph.interrupt_before, graph.interrupt_after)
    elif recorder is None:
        interrupts = NO_INTERRUPTS  # it cannot pause: interrupt() fails its node
    stop = CancelSignal("the graph was closed while the run was in progress", RunCancelled)
    context = ExecutionContext(
        graph, backend=backend, max_workers=settings["max_workers"],
        max_concurrency=settings["max_concurrency"], stop=stop,
        fan_out_limits=BranchLimits(branch_timeout=settings["branch_timeout"],
                                    fail_fast=settings["fail_fast"],
                                    branch_max_memory=graph.branch_max_memory,
                                    branch_retry=settings["branch_retry"],
                                    interrupts=interrupts),
        cancel=cancel, recorder=recorder)
    # Whether the run is traced is asked here, once: never per node or branch.
    context.spans = tracing = run_tracing(graph.name, settings["isolation"])
    context.replay = replay
    active.add(stop)
    paused: NodePaused | None = None
    try:
        if recorder is not None:
            if tracing is not None:
                tracing.recorded(recorder.run_id)
            yield {"type": "run", "run_id": recorder.run_id}
        # invoke() needs no per-branch events; stream() reports them, but not in values mode.
        steps = run_steps(graph, working, context, start=graph.entry, snapshots=snapshots,
                          branch_events=snapshots and mode is not StreamMode.VALUES,
                          resume=point, updates=mode is StreamMode.UPDATES)
        if mode is StreamMode.VALUES:
            steps = (event for event in steps if event["type"] in VALUES_EVENT_TYPES)
        yield from steps
    except NodePaused as signal:  # recorded below, once the run's context is closed
        paused = signal
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
        active.discard(stop)
        context.close()
        if tracing is not None:
            tracing.run_ended(sys.exc_info()[1])
    if paused is not None:
        assert recorder is not None  # a run without a checkpointer never pauses
        yield _pause(recorder, paused.interrupts, mode)
        return
    if recorder is not None:
        recorder.finished(RunStatus.SUCCEEDED, working)
    yield _final_event(working, mode)


def _pause(recorder: RunRecorder, interrupts: list[Interrupt], mode: StreamMode
           ) -> dict[str, Any]:
    """Record the run as interrupted, waiting for ``interrupts``; its last event.

    The state is the one a resume continues from (the recorded one), with
    ``"__interrupt__"``; in ``updates`` mode the event carries no state.
    """
    try:
        recorder.paused(interrupts)
    except GraphExecutionError as exc:  # a value the checkpoint cannot store
        exc.run_id = recorder.run_id
        _record_end(recorder, RunStatus.FAILED, exc)
        raise
    event: dict[str, Any] = {"type": "interrupt", "interrupts": list(interrupts)}
    if mode is not StreamMode.UPDATES:
        state = paused_state(recorder.store, recorder.run_id)
        state["__interrupt__"] = list(interrupts)
        event["state"] = state
    return event


def _final_event(state: dict, mode: StreamMode) -> dict[str, Any]:
    """The last event of a run. In ``updates`` mode it carries no state: that mode's
    events never grow with the state, and the final state is what ``invoke`` returns."""
    if mode is StreamMode.UPDATES:
        return {"type": "final"}
    return {"type": "final", "state": state}


def last_state(events: Iterator[dict[str, Any]]) -> dict:
    """Run ``events`` to the end; the state of the ``final`` event (or of the ``interrupt``
    event of a run that paused)."""
    final: dict = {}
    for event in events:
        if event["type"] in ("final", "interrupt"):
            final = event["state"]
    return final


def input_copy(schema: StateSchema, state: dict | None) -> dict:
    """A run's own copy of the caller's ``state``; ``GraphError`` if it cannot be one."""
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise GraphError(f"the input state must be a dict, got {type(state).__name__}")
    try:
        working = StateSnapshot(state).copy()
    except StateCopyError as exc:
        raise GraphError(f"the input state cannot be copied: {exc}") from exc
    if mismatched := schema.check_input(working):
        raise GraphError(problems=[f"the input state: {p}" for p in mismatched])
    return working


def resolve_config(graph: RunnableGraph, config: dict | None) -> dict[str, Any]:
    """The settings of one run: ``graph``'s, with what ``config`` overrides, checked.

    Every problem of ``config`` is named in one ``GraphError``.
    """
    settings = {"isolation": graph.isolation, "max_workers": graph.max_workers,
                "branch_timeout": graph.branch_timeout, "fail_fast": graph.fail_fast,
                "max_concurrency": graph.max_concurrency, "branch_retry": graph.branch_retry}
    if not config:
        return settings
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise GraphError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join((*CONFIG_KEYS, 'run_id', 'replay'))}")
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


def _record_end(recorder: RunRecorder, status: RunStatus, exc: BaseException) -> None:
    """Record a run's failed or interrupted end without hiding the exception that ended it."""
    try:
        recorder.finished(status, error=f"{type(exc).__name__}: {exc}")
    except Exception as record_error:
        exc.add_note(f"recording the end of run {recorder.run_id!r} failed too: "
                     f"{type(record_error).__name__}: {record_error}")
