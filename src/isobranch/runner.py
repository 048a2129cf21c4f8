"""The step loop: run nodes, route along edges, fan out and fan in, emit events."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .branch import BranchTask, ParallelFlowResult, format_traceback
from .checkpoint.store import StepKind
from .context import BranchCancelled, BranchTimeout
from .errors import GraphExecutionError
from .fanout import (
    FanOut,
    FanOutPlan,
    Gathered,
    MapFanOut,
    MapOverError,
    map_base_state,
    map_items,
    map_plan,
    static_plan,
)
from .isolation.base import stream_results
from .statecopy import StateCopyError, StateSnapshot, find_unpicklable

if TYPE_CHECKING:
    from .checkpoint.recorder import ResumePoint, RunRecorder
    from .context import ExecutionContext
    from .graph import CompiledGraph

START = "__start__"
END = "__end__"


class NodeFailure(GraphExecutionError):
    """A node raised or returned something unusable; names the node and branch."""


def run_steps(graph: CompiledGraph, state: dict, context: ExecutionContext, *, start: str,
              stop_at: str | None = None, snapshots: bool = False,
              branch_events: bool = False, resume: ResumePoint | None = None
              ) -> Iterator[dict[str, Any]]:
    """Run from ``start`` until END or ``stop_at`` (not run), mutating ``state``.

    Yields ``node`` and ``parallel`` events, and with ``branch_events`` a
    ``branch`` event per finished branch of a main-path fan-out; with
    ``snapshots`` each node event carries a shallow copy of the state so
    later steps do not change it. ``resume`` continues a recorded run after
    its last recorded step (``state`` is the state after it).
    """
    recorder = context.recorder if context.branch is None else None
    current, steps, ran = start, 0, False
    if resume is not None:
        current, steps, ran = resume.node, resume.steps, True
        if resume.after_fan_in:
            current, ran = _route(graph, current, state, context), False
    while current not in (END, stop_at):
        if not ran:  # a resumed step already ran; its fan-out, if any, is next
            steps += 1
            if steps > graph.max_steps:
                raise NodeFailure(
                    f"{_where(current, context)}: stopped after {graph.max_steps} steps "
                    f"(max_steps); the graph loops", node=current, branch=context.branch,
                    error_type="MaxStepsExceeded", state=dict(state))
            _run_node(graph, current, state, context, None)
            if recorder is not None:
                recorder.step(current, state, steps, StepKind.NODE)
            yield _node_event(current, state, snapshots)
        ran = False
        fan_out = graph.fan_out_of(current)
        if fan_out is not None:
            results = yield from _fan_out(graph, current, fan_out, state, context,
                                          branch_events=branch_events, recorder=recorder)
            yield {"type": "parallel", "fan_in": fan_out.fan_in, "branches": results}
            _run_node(graph, fan_out.fan_in, state, context, results)
            if recorder is not None:
                recorder.step(fan_out.fan_in, state, steps, StepKind.FAN_IN)
            yield _node_event(fan_out.fan_in, state, snapshots)
            current = fan_out.fan_in
        current = _route(graph, current, state, context)


def _node_event(node: str, state: dict, snapshot: bool) -> dict[str, Any]:
    return {"type": "node", "node": node, "state": dict(state) if snapshot else state}


def _where(node: str | None, context: ExecutionContext) -> str:
    where = f"node {node!r}"
    return f"{where} in branch {context.branch!r}" if context.branch else where


def _run_node(graph: CompiledGraph, name: str, state: dict, context: ExecutionContext,
              parallel_results: list[ParallelFlowResult] | None) -> None:
    context.enter_node(name)
    node = graph.nodes[name]
    try:
        update = context.resolve(node.run(state, context, parallel_results))
    except (BranchTimeout, BranchCancelled, GraphExecutionError):
        raise
    except Exception as exc:
        raise NodeFailure(f"{_where(name, context)} failed: {type(exc).__name__}: {exc}",
                          node=name, branch=context.branch, error_type=type(exc).__name__,
                          state=dict(state), traceback=format_traceback(exc)) from exc
    if update is None:
        return
    if not isinstance(update, dict):
        raise NodeFailure(
            f"{_where(name, context)} returned {type(update).__name__}, expected a dict or None",
            node=name, branch=context.branch, error_type="TypeError", state=dict(state))
    state.update(update)
    context.merged(name, update)


def _fan_out(graph: CompiledGraph, node: str, fan_out: FanOut, state: dict,
             context: ExecutionContext, *, branch_events: bool,
             recorder: RunRecorder | None = None
             ) -> Generator[dict[str, Any], None, list[ParallelFlowResult]]:
    """Run the branches of ``node``'s fan-out; yield a ``branch`` event per finished one
    (main path only) and return every result in declaration / item order.

    With a ``recorder`` (main path of a checkpointed run) each final result
    is recorded, and a resumed fan-out runs only the branches that have no
    recorded success; the recorded ones take their places in the results."""
    backend = context.fan_out_backend()
    crosses = bool(getattr(backend, "crosses_processes", False))
    base = state
    items: Sequence[Any] = ()
    if isinstance(fan_out, MapFanOut):
        try:
            items = map_items(fan_out, state, context)
        except (BranchTimeout, BranchCancelled, GraphExecutionError):
            raise
        except Exception as exc:
            detail = str(exc) if isinstance(exc, MapOverError) else (
                f"map over {fan_out.describe_over()} failed: {type(exc).__name__}: {exc}")
            raise NodeFailure(f"{_where(node, context)}: {detail}", node=node,
                              branch=context.branch, error_type=type(exc).__name__,
                              state=dict(state), traceback=format_traceback(exc)) from exc
        base = map_base_state(fan_out, state)
    try:
        snapshot = StateSnapshot(base)
    except StateCopyError as exc:
        raise NodeFailure(f"{_where(node, context)}: cannot copy the state for its branches: "
                          f"{exc}", node=node, branch=context.branch,
                          error_type="StateCopyError", state=dict(state)) from exc
    if crosses and not snapshot.picklable:
        path, reason = find_unpicklable(base, "state")
        raise NodeFailure(f"{_where(node, context)}: the state cannot be sent to "
                          f"{backend.name!r} workers: {path}: {reason}", node=node,
                          branch=context.branch, error_type="StateCopyError", state=dict(state))
    limits = context.fan_out_limits
    if isinstance(fan_out, MapFanOut):
        plan = map_plan(graph, fan_out, items, snapshot, limits, backend.name, context.branch,
                        must_pickle=crosses)
    else:
        plan = static_plan(graph, fan_out, snapshot, limits, backend.name, context.branch)
    gathered = Gathered(plan.total, limits.fail_fast, backend.name)
    max_concurrency = fan_out.max_concurrency or context.max_concurrency
    emit = branch_events and context.branch is None  # branches' own fan-outs never emit
    tasks, positions = plan.tasks, None
    if recorder is not None:
        tasks, positions = _skip_recorded(recorder, node, plan, gathered)
    stream = stream_results(backend, tasks, max_concurrency, context.fan_out_cancel)
    try:
        for position, result in stream:
            if positions is not None:
                position = positions[position]
            stop = gathered.add(position, result)
            if recorder is not None:
                recorder.branch_done(node, position, result)
            if emit:
                yield _branch_event(node, fan_out.fan_in, result, gathered)
            if stop:
                break
        if recorder is not None:
            recorder.fan_out_done()
        results = gathered.finish(plan.names, plan.indexes, backend.name)
    except StateCopyError as exc:  # an item that cannot be copied or sent
        raise NodeFailure(f"{_where(node, context)}: cannot copy an item for its map branches: "
                          f"{exc}", node=node, branch=context.branch,
                          error_type="StateCopyError", state=dict(state)) from exc
    except (GraphExecutionError, BranchCancelled, BranchTimeout):
        raise  # a failure under fail_fast; the branch this fan-out is in was cancelled
    except Exception as exc:  # the backend could not run the fan-out at all
        raise NodeFailure(f"fan-out from {_where(node, context)}: backend {backend.name!r} "
                          f"failed: {type(exc).__name__}: {exc}", node=node,
                          branch=context.branch, error_type=type(exc).__name__,
                          state=dict(state), traceback=format_traceback(exc)) from exc
    finally:
        # Stops whatever still runs (fail_fast, an exception, a consumer that
        # stopped reading events) before the fan-out is left.
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    failed = gathered.failure
    if failed is not None:
        raise GraphExecutionError(
            f"fan-out from {_where(node, context)}: branch {failed.branch!r} failed "
            f"(fail_fast): {failed.error}", node=failed.node, branch=failed.branch,
            error_type=failed.error_type, state=failed.state, results=results,
            timed_out=failed.timed_out, traceback=failed.traceback)
    return results


def _skip_recorded(recorder: RunRecorder, node: str, plan: FanOutPlan, gathered: Gathered
                   ) -> tuple[Iterator[BranchTask], list[int] | None]:
    """The tasks of ``plan`` still to run, and their positions in the plan (None: all).

    Recorded successes (a resumed fan-out) go into ``gathered`` first.
    """
    reused = recorder.fan_out_started(node, plan.total)
    if not reused:
        return plan.tasks, None
    for position, result in sorted(reused.items()):
        gathered.add(position, result)
    remaining = [position for position in range(plan.total) if position not in reused]
    return (task for position, task in enumerate(plan.tasks) if position not in reused), remaining


def _branch_event(node: str, fan_in: str, result: ParallelFlowResult, gathered: Gathered
                  ) -> dict[str, Any]:
    return {"type": "branch", "fan_out": node, "fan_in": fan_in, "branch": result.branch,
            "index": result.index, "success": result.success, "error_type": result.error_type,
            "timed_out": result.timed_out, "duration_ms": result.duration_ms, "attempts": 1,
            "done": gathered.done, "total": len(gathered.results)}


def _route(graph: CompiledGraph, node: str, state: dict, context: ExecutionContext) -> str:
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
                    f"{sorted(map(repr, routes.mapping))}", node=node, branch=context.branch,
                    error_type="RoutingError", state=dict(state))
            if target != END and target not in graph.nodes:
                raise NodeFailure(f"{_where(node, context)}: router chose unknown node "
                                  f"{target!r}", node=node, branch=context.branch,
                                  error_type="RoutingError", state=dict(state))
            return target
        for condition, target in routes.conditional:
            if condition.holds(state, context):
                return target
    except (BranchTimeout, BranchCancelled, GraphExecutionError):
        raise
    except Exception as exc:
        raise NodeFailure(f"{_where(node, context)}: edge condition failed: "
                          f"{type(exc).__name__}: {exc}", node=node, branch=context.branch,
                          error_type=type(exc).__name__, state=dict(state),
                          traceback=format_traceback(exc)) from exc
    if routes.default is not None:
        return routes.default
    if routes.conditional:
        raise NodeFailure(f"{_where(node, context)}: no outgoing edge condition held and there "
                          f"is no unconditional edge", node=node, branch=context.branch,
                          error_type="RoutingError", state=dict(state))
    return END
