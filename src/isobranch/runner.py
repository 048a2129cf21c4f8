"""The step loop: run nodes, route along edges, fan out and fan in, emit events."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .branch import (
    CANCELLED,
    BranchGraph,
    BranchTask,
    ParallelFlowResult,
    format_traceback,
    result_name,
)
from .checkpoint.recorder import ResumePoint
from .conditions import Expression
from .error_kinds import ErrorKind
from .errors import (
    BranchCancelled,
    BranchTimeout,
    FanOutPlanError,
    GraphExecutionError,
    NodeFailure,
    NodePaused,
    RetriesStopped,
    StateCopyError,
)
from .fanout import FanOut, MapFanOut, StaticFanOut, plan_fan_out
from .fanout_run import BranchFinished, FanOutRun, RetryNotice
from .interrupts import (
    Breakpoint,
    Interrupt,
    InterruptSettings,
    enter_site,
    leave_site,
)
from .keys import Language
from .node_memo import NodeMemos, open_memo
from .nodes import Node
from .retry import exception_names, failure_names, not_retried_note, wait_unless
from .routes import END, Routes
from .schema import STATE_TYPE_ERROR
from .statecopy import StateSnapshot
from .stream_modes import parallel_summary, update_event
from .subgraph import SubgraphNode

if TYPE_CHECKING:
    from .checkpoint.recorder import RunRecorder
    from .context import ExecutionContext
    from .isolation.base import IsolationBackend
    from .replay import Tape
    from .retry import RetryPolicy
    from .schema import StateSchema
    from .trace_records import Spans, TraceParent

logger = logging.getLogger(__name__)

# How many failed branches the error of a fan-in node names (then a count).
_FAILED_BRANCHES_NAMED = 10


class StepGraph(BranchGraph, Protocol):
    """What the step loop needs of a compiled graph (``compiled.CompiledGraph`` has it;
    the compiled graph calls the step loop, so the loop is handed it as this)."""

    nodes: Mapping[str, Node]
    # The nodes with no cache or recording, no retry policy, that are no subgraph.
    plain_nodes: frozenset[str]
    # The subgraph nodes with no cache or recording and no retry policy.
    plain_subgraphs: frozenset[str]
    # Every node is plain and none fans out.
    all_plain: bool
    entry: str
    node_retries: Mapping[str, RetryPolicy]
    memos: NodeMemos
    schema: StateSchema
    max_steps: int

    def fan_out_of(self, node: str) -> FanOut | None:
        """How ``node`` fans out, or None."""
        ...

    def routes_of(self, node: str) -> Routes:
        """The outgoing routes of ``node``."""
        ...


def run_steps(graph: StepGraph, state: dict, context: ExecutionContext, *, start: str,
              stop_at: str | None = None, snapshots: bool = False,
              branch_events: bool = False, resume: ResumePoint | None = None,
              updates: bool = False) -> Iterator[dict[str, Any]]:
    """Run from ``start`` until END or ``stop_at`` (not run), mutating ``state``.

    Every node that runs is a step (``max_steps``), a fan-in node too, and
    any of them fans out when it has a fan-out, whatever reached it.

    Yields ``node`` and ``parallel`` events, a ``node_retry`` event before a
    node's retry, and with ``branch_events`` a ``branch`` event per finished
    branch of a main-path fan-out (a ``branch_retry`` per attempt that will
    be retried); with
    ``snapshots`` each node event carries a shallow copy of the state so
    later steps do not change it. ``resume`` continues a recorded run after
    its last recorded step (``state`` is the state after it). With
    ``updates`` (``stream(mode="updates")``) a node event carries the node's
    update instead of the state and a ``parallel`` event only counts.
    """
    recorder = context.recorder if context.branch_name is None else None
    spans = context.spans  # None: not traced
    ends = (END, stop_at)
    # After a fan-out: its fan-in node runs next, with these. It runs even
    # where the path stops (a nested fan-out meeting at its branch's own
    # fan-in node) and is then a node like any other: it may fan out again.
    results: list[ParallelFlowResult] | None = None
    current, steps, ran, inside = start, 0, False, None
    if resume is not None:
        # A resumed step already ran, and its fan-out, if any, is next; unless the
        # run stopped inside it (a subgraph node), which then runs on from there.
        # A branch that paused runs its interrupted node ``again``.
        inside = resume.inner
        ran = inside is None and not resume.again
        current, steps = resume.node, resume.steps - (not ran)
    # Breakpoints pause the top graph's main path only.
    breakpoints = context.interrupts if (
        context.branch_name is None and not context.prefix and (
            context.interrupts.before or context.interrupts.after)) else None
    # The nodes that just run: no breakpoint, span, cache, retry or subgraph on the way.
    # (The usual case, and a branch's loop runs once per node.)
    unobserved = spans is None and breakpoints is None
    plain = graph.plain_nodes if unobserved else frozenset()
    plain_subgraphs = graph.plain_subgraphs if unobserved else frozenset()
    # Where node names are shown (inside a subgraph node: under its path); a subgraph
    # node run from this loop puts it back before the loop goes on.
    prefix = context.prefix
    while current not in ends or ran or results is not None:
        if not ran:
            steps += 1
            if steps > graph.max_steps:
                raise _looping(graph, current, state, context)
            try:
                recalled = None
                if current in plain:
                    update = _run_node(graph, current, state, context, results)
                elif current in plain_subgraphs and inside is None:
                    update = yield from _run_subgraph(graph.nodes[current], state, context,
                                                      start, steps, snapshots, branch_events,
                                                      None, updates)
                    _merge(graph, current, update, state, context)
                else:
                    update, recalled = yield from _run_step(
                        graph, current, state, context, results, breakpoints,
                        SubgraphRun(start, steps, snapshots, branch_events, inside, updates))
                    inside = None
            except NodePaused as paused:
                if paused.point is None:  # paused in this node: a resume runs it again
                    paused.point = ResumePoint(current, steps, again=True)
                raise
            if recorder is not None:
                recorder.step(current, state, steps, fan_in=results is not None)
            path = prefix + current if prefix else current
            event = update_event(path, update) if updates else \
                {"type": "node", "node": path, "state": dict(state) if snapshots else state}
            if recalled is not None:
                event[recalled.value] = True
            yield event
            if breakpoints is not None and current in breakpoints.after:
                raise NodePaused([Interrupt(current, None, current, None, Breakpoint.AFTER)])
        ran, results = False, None
        # Whatever reached this node (an edge, a loop, a fan-in), its fan-out starts now.
        fan_out = graph.fan_out_of(current)
        if fan_out is None:
            current = _route(graph, current, state, context)
            continue
        span = (spans.fan_out_started(context.path_of(current), context.path_of(fan_out.fan_in))
                if spans is not None else None)
        try:
            results = yield from _fan_out(graph, current, fan_out, state, context,
                                          branch_events=branch_events, recorder=recorder,
                                          span=span)
        except BaseException as exc:
            if span is not None:
                spans.fan_out_ended(span, error=exc)
            raise
        if span is not None:
            spans.fan_out_ended(span, results)
        paused = [i for result in results for i in result.interrupts]
        if paused:
            # Every branch finished or paused: the fan-in node waits for the answers. A
            # resume continues after ``current``, so its fan-out comes next.
            signal = NodePaused(paused)
            signal.point = ResumePoint(current, steps)
            raise signal
        fan_in = context.path_of(fan_out.fan_in)
        yield parallel_summary(context.path_of(current), fan_in, results) if updates else \
            {"type": "parallel", "fan_in": fan_in, "branches": results}
        # Branches' writes to reducer keys reach the state before the fan-in node runs.
        graph.schema.combine(state, results, node=fan_in, context=context)
        current = fan_out.fan_in


def _run_step(graph: StepGraph, current: str, state: dict, context: ExecutionContext,
              results: list[ParallelFlowResult] | None, breakpoints: InterruptSettings | None,
              subgraph: SubgraphRun) -> Generator[dict[str, Any], None, tuple[Any, Any]]:
    """Run node ``current`` as one step when it is not plain: a breakpoint before it, its
    span, its cache or recording, its retries, its subgraph. Yield the events of its
    retries and inner nodes; return its update and, when that was recalled instead of
    run, where from (a ``node_memo`` recall kind, else None)."""
    if breakpoints is not None:
        passed, breakpoints.passed = breakpoints.passed, None  # once, on resume
        if current in breakpoints.before and current != passed:
            raise NodePaused([Interrupt(current, None, current, None, Breakpoint.BEFORE)])
    spans = context.spans
    span = spans.node_started(context.path_of(current)) if spans is not None else None
    node = graph.nodes[current]
    try:
        # A cached or recorded node whose update is known does not run.
        memo = (open_memo(graph.memos, current, state, context)
                if current in graph.memos.nodes else None)
        if memo is not None and memo.recalled is not None:
            context.enter_node(current)
            update = memo.update
            _merge(graph, current, update, state, context)
        elif current in graph.node_retries:
            attempts = _run_node_with_retries(graph, current, state, context, results,
                                              subgraph)
            update = yield from (attempts if span is None
                                 else _noting_retries(attempts, spans, span))
        elif isinstance(node, SubgraphNode):
            # Not entered itself: its first inner node is at once (deadline,
            # cancellation, the watchdog's view; a worker tells its parent once).
            update = yield from _run_subgraph(node, state, context, *subgraph)
            _merge(graph, current, update, state, context)
        else:
            update = _run_node(graph, current, state, context, results)
        if memo is not None and memo.recalled is None:
            memo.keep(update)
    except BaseException as exc:
        if span is not None:
            spans.node_ended(span, exc)  # type: ignore[union-attr]
        raise
    if span is not None:
        spans.node_ended(span)  # type: ignore[union-attr]
    return update, (memo.recalled if memo is not None else None)


class SubgraphRun(NamedTuple):
    """What a node with a retry policy needs to run as a subgraph: ``_run_subgraph``'s
    arguments after the context (the step loop's first node, the node's step, the
    loop's event options, and where a resumed run stopped inside it)."""

    start: str
    steps: int
    snapshots: bool
    branch_events: bool
    resume: ResumePoint | None = None
    updates: bool = False


def _run_subgraph(node: SubgraphNode, state: dict, context: ExecutionContext, start: str,
                  steps: int, snapshots: bool, branch_events: bool, resume: ResumePoint | None,
                  updates: bool = False) -> Generator[dict[str, Any], None, dict]:
    """Run subgraph ``node``'s inner graph from its START to its END on a private copy of its
    input; yield the inner events (names are paths) and return the node's update.

    A map or static branch that starts at the node is named after the branch
    (``review[3]/score``). On a recorded main path the inner steps are
    recorded under the node's path (its step ``steps``); ``resume`` continues
    them. ``start`` is the first node of the step loop that met it;
    ``snapshots``, ``branch_events`` and ``updates`` are that loop's (``run_steps``).
    """
    name, inner = node.name, node.graph
    branch_itself = context.branch_name is not None and not context.prefix and name == start
    shown = result_name(name, context.branch_index) if branch_itself else name
    try:
        inner_state = node.inner_state(state) if resume is None else resume.state
    except StateCopyError as exc:
        raise NodeFailure(f"{_where(name, context)}: cannot copy the state into its subgraph: "
                          f"{exc}", node=context.path_of(name), branch=context.branch_name,
                          error_type=ErrorKind.STATE_COPY_ERROR, state=dict(state)) from exc
    if resume is None and inner.schema.fields and (mismatched := inner.schema.check_input(
            inner_state)):
        raise NodeFailure(f"{_where(name, context)}: its subgraph's input: "
                          f"{'; '.join(mismatched)}", node=context.path_of(name),
                          branch=context.branch_name, error_type=STATE_TYPE_ERROR,
                          state=dict(state))
    recorder = context.recorder if context.branch_name is None else None
    # Nothing records, traces or resumes its steps and each just runs: the short loop.
    plainly = (inner.all_plain and recorder is None and resume is None
               and context.spans is None)
    outer = context.enter_subgraph(
        inner, shown, branch_itself=branch_itself,
        recorder=recorder.inside(name, state, steps) if recorder is not None else None)
    try:
        if plainly:
            yield from _run_plain_steps(inner, inner_state, context, snapshots, updates)
        else:
            yield from run_steps(inner, inner_state, context, start=inner.entry,
                                 snapshots=snapshots, branch_events=branch_events,
                                 resume=resume, updates=updates)
    except NodePaused as paused:
        # A branch resumes inside the subgraph, on its inner state as of the pause.
        if paused.point is not None:
            paused.point = ResumePoint(name, steps, inner=replace(paused.point, state=inner_state))
        raise
    finally:
        context.leave_subgraph(outer)
    return node.update(inner_state)


def _run_plain_steps(graph: StepGraph, state: dict, context: ExecutionContext, snapshots: bool,
                     updates: bool) -> Generator[dict[str, Any], None, None]:
    """``run_steps`` from ``graph``'s entry to END for a graph whose nodes are all plain
    and none fans out, with no recorder, span or breakpoint: what that loop does for
    such a graph, without what it does for any other (a subgraph node run per map
    item is most often one plain node)."""
    prefix = context.prefix
    current, steps = graph.entry, 0
    while current != END:
        steps += 1
        if steps > graph.max_steps:
            raise _looping(graph, current, state, context)
        try:
            update = _run_node(graph, current, state, context, None)
        except NodePaused as paused:
            if paused.point is None:  # paused in this node: a resume runs it again
                paused.point = ResumePoint(current, steps, again=True)
            raise
        path = prefix + current
        yield update_event(path, update) if updates else \
            {"type": "node", "node": path, "state": dict(state) if snapshots else state}
        current = _route(graph, current, state, context)


def _looping(graph: StepGraph, current: str, state: dict, context: ExecutionContext
             ) -> NodeFailure:
    """The error of a run about to take more than ``max_steps`` steps at node ``current``."""
    return NodeFailure(f"{_where(current, context)}: stopped after {graph.max_steps} steps "
                       f"(max_steps); the graph loops", node=context.path_of(current),
                       branch=context.branch_name, error_type="MaxStepsExceeded",
                       state=dict(state))


def _noting_retries(attempts: Generator[dict[str, Any], None, Any], spans: Spans, span: Any
                    ) -> Generator[dict[str, Any], None, Any]:
    """``attempts`` (a node's retries), telling ``spans`` of each ``node_retry`` event."""
    while True:
        try:
            event = next(attempts)
        except StopIteration as stop:
            return stop.value
        spans.node_retried(span, event)
        yield event


def _where(node: str, context: ExecutionContext) -> str:
    where = f"node {context.path_of(node)!r}"
    return f"{where} in branch {context.branch_name!r}" if context.branch_name else where


def _at(code: Iterable[Any], error: BaseException) -> str:
    """`` (at agent.yaml:16, line 2 of its code)`` if one of ``code`` (read from a file) raised ``error``.

    It ends the message, so text that matched a message before still does.
    """
    for part in code:
        site = part.failure_site(error) if isinstance(part, (Node, Expression)) else None
        if site is not None:
            return f" ({site})"
    return ""


def _run_node(graph: StepGraph, name: str, state: dict, context: ExecutionContext,
              parallel_results: list[ParallelFlowResult] | None) -> Any:
    """Run node ``name`` and merge what it returned into ``state``; return that update."""
    try:
        context.enter_node(name)
        # interrupt() finds this call through the running context: a branch made it the
        # running site for its whole run; the main path does it per call.
        token = None if context.is_running_site else enter_site(context)
        context.calling, context.calling_scope = name, None
        try:
            update = graph.nodes[name].run(state, context, parallel_results)
            if update is not None and type(update) is not dict:  # maybe awaitable: resolve
                update = context.resolve(update)
        except (BranchTimeout, BranchCancelled, GraphExecutionError):
            raise
        except Exception as error:
            scope = context.calling_scope  # None unless the node called interrupt()
            if scope is not None and scope.pending is not None:
                raise NodePaused([scope.pending]) from None  # it turned its pause into an error
            # (Lua turns a refused pause into its own error)
            exc = (scope.refused or error) if scope is not None else error
            raise NodeFailure(f"{_where(name, context)} failed: {type(exc).__name__}: {exc}"
                              f"{_at([graph.nodes[name]], exc)}",
                              node=context.path_of(name), branch=context.branch_name,
                              error_type=type(exc).__name__,
                              state=dict(state), traceback=format_traceback(exc),
                              error_bases=exception_names(type(exc))) from exc
        finally:
            context.calling = None
            if token is not None:
                leave_site(token)
        scope = context.calling_scope
        if scope is not None and scope.pending is not None:  # the node swallowed its pause
            raise NodePaused([scope.pending])
        _merge(graph, name, update, state, context)
    except GraphExecutionError as exc:
        if parallel_results:
            _name_failed_branches(exc, parallel_results, context)
        raise
    return update


def _run_node_with_retries(graph: StepGraph, name: str, state: dict,
                           context: ExecutionContext,
                           parallel_results: list[ParallelFlowResult] | None,
                           subgraph: SubgraphRun) -> Generator[dict[str, Any], None, Any]:
    """Run a node that has a retry policy; yield a ``node_retry`` event before each backoff.

    Returns what the attempt that succeeded returned.

    A subgraph node's attempt is its whole inner run: any failure in it
    (a ``GraphExecutionError`` naming the inner node) counts as the node's,
    and the next attempt starts the inner graph over from its START.
    """
    try:
        context.enter_node(name)
        node = graph.nodes[name]
        inner = node if isinstance(node, SubgraphNode) else None
        policy = graph.node_retries[name]
        # Every attempt runs on its own deep copy of the input, so what a failed
        # attempt changed in place is never seen.
        pristine = _input_snapshot(name, state, context)
        attempt = 1
        while True:
            working = pristine.copy()
            # A subgraph's inner nodes are the calls that may ask (their own _run_node).
            token = None if inner is not None or context.is_running_site \
                else enter_site(context)
            context.calling, context.calling_scope = (name if inner is None else None), None
            try:
                if inner is not None:
                    update = yield from _run_subgraph(inner, working, context, *subgraph)
                else:
                    update = context.resolve(node.run(working, context, parallel_results))
                scope = context.calling_scope if inner is None else None
                if scope is not None and scope.pending is not None:  # it swallowed its pause
                    raise NodePaused([scope.pending])
                break
            except (BranchTimeout, BranchCancelled):
                raise
            except GraphExecutionError as exc:
                if inner is None:
                    raise
                failure, cause = _Failure(exc.error_type, tuple(exc.error_bases), str(exc),
                                          exc.node, exc.traceback), exc
            except Exception as exc:
                scope = context.calling_scope if inner is None else None
                if scope is not None and scope.pending is not None:
                    raise NodePaused([scope.pending]) from None  # it turned its pause into an error
                if scope is not None and scope.refused is not None:
                    # no retry gives the run a checkpointer
                    raise NodeFailure(f"{_where(name, context)} failed: "
                                      f"{type(scope.refused).__name__}: {scope.refused}",
                                      node=context.path_of(name), branch=context.branch_name,
                                      error_type=type(scope.refused).__name__,
                                      state=dict(state)) from scope.refused
                failure, cause = _Failure(type(exc).__name__, exception_names(type(exc)),
                                          f"{type(exc).__name__}: {exc}{_at([node], exc)}",
                                          context.path_of(name), format_traceback(exc)), exc
            finally:
                context.calling = None
                if token is not None:
                    leave_site(token)
            subgraph = subgraph._replace(resume=None)  # a retry starts a subgraph over
            delay = _retry_delay(policy, attempt, failure.names)
            if delay is None:
                note = not_retried_note(policy, attempt, failure.error_type, failure.names)
                raise NodeFailure(
                    f"{_where(name, context)} failed on attempt {attempt} of "
                    f"{policy.max_attempts}{note}: {failure.message}",
                    node=failure.node, branch=context.branch_name, error_type=failure.error_type,
                    state=dict(state), traceback=failure.traceback,
                    error_bases=failure.bases, attempts=attempt) from cause
            logger.warning("%s failed on attempt %d of %d (%s); retrying in %.3gs",
                           _where(name, context), attempt, policy.max_attempts,
                           failure.message, delay)
            yield {"type": "node_retry", "node": context.path_of(name), "attempt": attempt,
                   "max_attempts": policy.max_attempts, "error": failure.message,
                   "error_type": failure.error_type, "retry_in": delay}
            _wait_to_retry(name, delay, attempt, context)
            attempt += 1
            context.enter_node(name)
        # The attempt that succeeded: what it changed in place counts, as for any node.
        state.clear()
        state.update(working)
        _merge(graph, name, update, state, context)
    except GraphExecutionError as exc:
        if parallel_results:
            _name_failed_branches(exc, parallel_results, context)
        raise
    return update


@dataclass(frozen=True, slots=True)
class _Failure:
    """One failed attempt of a node, as its retry policy and its error see it."""

    error_type: str | None
    bases: tuple[str, ...]
    message: str
    node: str | None
    traceback: str | None

    @property
    def names(self) -> set[str]:
        return failure_names(self.error_type, self.bases)


def _name_failed_branches(exc: GraphExecutionError, results: list[ParallelFlowResult],
                          context: ExecutionContext) -> None:
    """Name, in the error of a fan-in node, the branches that had failed before it ran.

    A fan-in node that fails after some of its branches failed most often
    fails because of them (it reads what they never wrote); its error says
    so, and carries the results for whoever wants the branches' own errors.
    An error that already carries results (a fan-out of its own) is left as
    it is.
    """
    failed = [result for result in results if not result.success]
    if not failed or exc.results is not None:
        return
    names = ", ".join(f"{context.path_of(result.branch)!r} ({result.error_type})"
                      for result in failed[:_FAILED_BRANCHES_NAMED])
    if len(failed) > _FAILED_BRANCHES_NAMED:
        names += f" and {len(failed) - _FAILED_BRANCHES_NAMED} more"
    exc.args = (f"{exc.args[0]}; it ran after {len(failed)} of {len(results)} branches "
                f"failed: {names}", *exc.args[1:])
    exc.results = results


def _merge(graph: StepGraph, name: str, update: Any, state: dict,
           context: ExecutionContext) -> None:
    if update is None:
        return
    if not isinstance(update, dict):
        raise NodeFailure(
            f"{_where(name, context)} returned {type(update).__name__}, expected a dict or None",
            node=context.path_of(name), branch=context.branch_name, error_type="TypeError", state=dict(state))
    schema = graph.schema
    if schema.fields:
        applied = schema.apply(state, update, node=context.path_of(name), context=context,
                               from_lua=graph.nodes[name].language == Language.LUA)
    else:  # no declared keys: nothing to check or reduce (what apply does, without a call)
        state.update(update)
        applied = update
    if context.watchdog is not None:
        context.merged(name, applied)


def _input_snapshot(name: str, state: dict, context: ExecutionContext) -> StateSnapshot:
    try:
        return StateSnapshot(state)
    except StateCopyError as exc:
        raise NodeFailure(f"{_where(name, context)}: cannot copy the state for its retries: "
                          f"{exc}", node=context.path_of(name), branch=context.branch_name,
                          error_type=ErrorKind.STATE_COPY_ERROR, state=dict(state)) from exc


def _retry_delay(policy: RetryPolicy, attempt: int, names: set[str]) -> float | None:
    """Seconds before the next attempt of a node whose failure answers to ``names``;
    None: no next attempt."""
    if attempt >= policy.max_attempts:
        return None
    if not policy.retries(names):
        return None
    return policy.delay(attempt)


def _wait_to_retry(name: str, delay: float, attempt: int, context: ExecutionContext) -> None:
    """Back off before attempt ``attempt + 1``; never past the branch deadline, and not at all
    once the branch is cancelled or the graph closed."""
    late = context.deadline is not None and time.monotonic() + delay >= context.deadline
    if late:
        delay = max(context.deadline - time.monotonic(), 0.0)
    interrupted = wait_unless(delay, context.stop_flags())
    if interrupted and context.cancel is not None:
        context.cancel.raise_if_set()  # the run was cancelled: RunCancelled, as anywhere
    if interrupted:
        reason = context.cancelled_reason() or f"node {name!r} stopped"
        if context.branch_name is not None:
            raise BranchCancelled(f"{reason} (waiting to retry after attempt {attempt})")
        raise NodeFailure(f"{reason} (waiting to retry after attempt {attempt})", node=context.path_of(name),
                          error_type=CANCELLED, attempts=attempt)
    context.check_deadline()


def _fan_out(graph: StepGraph, node: str, fan_out: FanOut, state: dict,
             context: ExecutionContext[IsolationBackend], *, branch_events: bool,
             recorder: RunRecorder | None = None, span: Any = None
             ) -> Generator[dict[str, Any], None, list[ParallelFlowResult]]:
    """Plan ``node``'s fan-out and hand it to the fan-out driver; yield a ``branch`` event
    per finished branch (main path only) and return every result in declaration / item order.

    With a ``recorder`` (main path of a checkpointed run) each final result
    is recorded, and a resumed fan-out runs only the branches that have no
    recorded success; the recorded ones take their places in the results.
    ``span``: the fan-out's span (traced: its branches' tasks carry it, and
    its spans take what every attempt sent back)."""
    backend = context.fan_out_backend()
    try:
        plan = plan_fan_out(graph, fan_out, state, context, isolation=backend.name,
                            crosses_processes=backend.crosses_processes)
    except FanOutPlanError as exc:
        raise NodeFailure(f"{_where(node, context)}: {exc}", node=context.path_of(node),
                          branch=context.branch_name,
                          error_type=exc.error_type, state=dict(state),
                          traceback=exc.traceback) from exc
    limits = context.fan_out_limits
    retry_of = _retry_of(fan_out, limits.branch_retry)
    emit = branch_events and context.branch_name is None  # branches' own fan-outs never emit
    recording = recorder.fan_out(node, plan.total) if recorder is not None else None
    if recording is not None and recording.paused:
        plan.tasks = _resuming(plan.tasks, recording.paused)
    attempt_observer = None
    if span is not None:
        spans = context.spans
        assert spans is not None
        plan.tasks = _traced(plan.tasks, spans.fan_out_planned(span, plan.total, backend.name))
        attempt_observer = lambda run, result: spans.branch_attempt_ended(  # noqa: E731
            span, run.attempt, result)
    tape = context.replay
    if tape is not None:
        plan.tasks = _taped(plan.tasks, tape)
    # A map edge's own fail-fast cancels its unstarted branches; the graph's fails the run.
    cancel_unstarted = (not limits.fail_fast and isinstance(fan_out, MapFanOut)
                        and fan_out.cancel_unstarted_on_failure)
    run = FanOutRun(backend, plan, fail_fast=limits.fail_fast or cancel_unstarted,
                    cancel_unstarted=cancel_unstarted,
                    max_concurrency=fan_out.max_concurrency or context.max_concurrency,
                    retry_of=retry_of, cancel=context.fan_out_cancel,
                    # Without retries nothing waits that close() would have to end.
                    stop_flags=context.stop_flags() if retry_of is not None else (),
                    recorded=recording.recorded if recording is not None else None,
                    observers=[recording] if recording is not None else (), notes=emit,
                    attempt_observer=attempt_observer)
    try:
        for note in run:
            yield _branch_event(node, fan_out.fan_in, note, run, context)
        results = run.results
    except StateCopyError as exc:  # an item that cannot be copied or sent
        raise NodeFailure(f"{_where(node, context)}: cannot copy an item for its map branches: "
                          f"{exc}", node=context.path_of(node), branch=context.branch_name,
                          error_type=ErrorKind.STATE_COPY_ERROR, state=dict(state)) from exc
    except (GraphExecutionError, BranchCancelled, BranchTimeout):
        raise  # a failure under fail_fast; the branch this fan-out is in was cancelled
    except RetriesStopped as exc:
        raise NodeFailure(f"fan-out from {_where(node, context)}: {exc}",
                          node=context.path_of(node),
                          branch=context.branch_name, error_type=CANCELLED,
                          state=dict(state)) from exc
    except Exception as exc:  # the backend could not run the fan-out at all
        raise NodeFailure(f"fan-out from {_where(node, context)}: backend {backend.name!r} "
                          f"failed: {type(exc).__name__}: {exc}", node=context.path_of(node),
                          branch=context.branch_name, error_type=type(exc).__name__,
                          state=dict(state), traceback=format_traceback(exc)) from exc
    if tape is not None:
        for result in results:
            if result is not None and result.recordings:
                tape.absorb(result.recordings)
    failed = run.failure
    if failed is not None:
        raise GraphExecutionError(
            f"fan-out from {_where(node, context)}: branch {context.path_of(failed.branch)!r} "
            f"failed (fail_fast): {failed.error}", node=failed.node,
            branch=context.path_of(failed.branch),
            error_type=failed.error_type, state=failed.state, results=results,
            timed_out=failed.timed_out, traceback=failed.traceback)
    return results


def _resuming(tasks: Iterator[BranchTask], paused: dict[int, ParallelFlowResult]
              ) -> Iterator[BranchTask]:
    """``tasks``, those of the branches that paused (by position) continuing where they
    paused, on their state as of the pause: the nodes they ran before never run again."""
    for position, task in enumerate(tasks):
        result = paused.get(position)
        if result is not None:
            task.snapshot, task.overlay = StateSnapshot(result.state), None
            task.resume_at, task.route = result.resume_at, result.route
        yield task


def _traced(tasks: Iterator[BranchTask], parent: TraceParent) -> Iterator[BranchTask]:
    """``tasks``, each carrying the span its branch's spans go under."""
    for task in tasks:
        task.trace = parent
        yield task


def _taped(tasks: Iterator[BranchTask], tape: Tape) -> Iterator[BranchTask]:
    """``tasks``, each carrying the run's tape of recorded nodes."""
    for task in tasks:
        task.replay = tape
        yield task


def _retry_of(fan_out: FanOut, default: RetryPolicy | None
              ) -> Callable[[int], RetryPolicy | None] | None:
    """The retry policy of each branch of ``fan_out`` by position (None: no branch retries)."""
    policies = fan_out.retries if isinstance(fan_out, StaticFanOut) else (fan_out.retry,)
    if default is None and not any(policies):
        return None
    return lambda position: fan_out.retry_of(position) or default


def _branch_event(node: str, fan_in: str, note: BranchFinished | RetryNotice, run: FanOutRun,
                  context: ExecutionContext) -> dict[str, Any]:
    """A ``branch`` event (a final result) or a ``branch_retry`` event (an attempt failed).

    Inside a subgraph node, nodes and branches are named by their paths.
    """
    result = note.result
    node, fan_in = context.path_of(node), context.path_of(fan_in)
    branch = context.path_of(result.branch)
    if isinstance(note, RetryNotice):
        return {"type": "branch_retry", "fan_out": node, "fan_in": fan_in,
                "branch": branch, "index": result.index, "attempt": result.attempts,
                "max_attempts": note.max_attempts, "error": result.error,
                "error_type": result.error_type, "timed_out": result.timed_out,
                "duration_ms": result.duration_ms, "retry_in": note.delay,
                "done": run.done, "total": run.total}
    return {"type": "branch", "fan_out": node, "fan_in": fan_in, "branch": branch,
            "index": result.index, "success": result.success, "error_type": result.error_type,
            "timed_out": result.timed_out, "duration_ms": result.duration_ms,
            "attempts": result.attempts, "done": note.done, "total": note.total}


def _route(graph: StepGraph, node: str, state: dict, context: ExecutionContext) -> str:
    routes = graph.routes_of(node)
    try:
        if routes.router is not None:
            value = context.resolve(routes.router(state))
            if routes.mapping is None:
                target = value
            elif value in routes.mapping:
                target = routes.mapping[value]
            else:
                raise NodeFailure(
                    f"{_where(node, context)}: router returned {value!r}, which is not one of "
                    f"{sorted(map(repr, routes.mapping))}", node=context.path_of(node),
                    branch=context.branch_name,
                    error_type="RoutingError", state=dict(state))
            if target != END and target not in graph.nodes:
                raise NodeFailure(f"{_where(node, context)}: router chose unknown node "
                                  f"{target!r}", node=context.path_of(node), branch=context.branch_name,
                                  error_type="RoutingError", state=dict(state))
            return target
        for condition, target in routes.conditional:
            if condition.holds(state, context):
                return target
    except (BranchTimeout, BranchCancelled, GraphExecutionError):
        raise
    except Exception as exc:
        conditions = [condition for condition, _ in routes.conditional]
        raise NodeFailure(f"{_where(node, context)}: edge condition failed: "
                          f"{type(exc).__name__}: {exc}{_at(conditions, exc)}",
                          node=context.path_of(node), branch=context.branch_name,
                          error_type=type(exc).__name__, state=dict(state),
                          traceback=format_traceback(exc)) from exc
    if routes.default is not None:
        return routes.default
    if routes.conditional:
        raise NodeFailure(f"{_where(node, context)}: no outgoing edge condition held and there "
                          f"is no unconditional edge", node=context.path_of(node), branch=context.branch_name,
                          error_type="RoutingError", state=dict(state))
    return END


def route(graph: StepGraph, node: str, state: dict, context: ExecutionContext) -> str:
    """Where the path goes after ``node`` on ``state``: a node's name or ``END`` (router,
    conditions in order, default edge), as the step loop routes it."""
    return _route(graph, node, state, context)
