"""A recorded run's history: its state now (``RunState``), its steps (``StepRecord``), forks.

``CompiledGraph.get_state``, ``history`` and ``fork`` delegate here. The
checkpoint database already holds the state after every main-path step
(and every step inside a main-path subgraph node, with the frames from the
main path in), so history is read, never recomputed. What runs next is
worked out from the graph: the edges, conditions and fan-outs from the
last recorded step, as a resume would take them.

A fork is a new run recorded as a copy of the original up to the chosen
step, with the update merged into that step's state; the original run is
only ever read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .branch import BranchLimits
from .checkpoint.codec import encode_value
from .checkpoint.recorder import new_run_id as fresh_run_id
from .checkpoint.runs import check_run_id, decode_recorded, decode_recorded_state
from .checkpoint.store import (
    RecordedStep,
    RunRow,
    RunStatus,
    SqliteCheckpointer,
    StepKind,
    StepRow,
)
from .context import ExecutionContext
from .errors import GraphError, GraphExecutionError, StateEncodeError
from .fanout import MapFanOut, map_items
from .interrupts import Breakpoint, Interrupt
from .routes import END, START
from .runner import StepGraph, route
from .subgraph import PATH_SEPARATOR, SubgraphNode


class HistoryGraph(StepGraph, Protocol):
    """What run history reads of a compiled graph (a ``CompiledGraph`` is one): what the
    step loop routes with, its entry and its checkpointer."""

    entry: str
    checkpointer: SqliteCheckpointer | None


@dataclass(frozen=True)
class RunState:
    """A recorded run as it stands (``CompiledGraph.get_state``).

    ``values``: the state as of the last recorded step, or of the pause
    (the run's input when no step was recorded; its final state once it
    succeeded). ``status``: the ``RunStatus``. ``next``: the nodes a resume
    would run next (a paused or unfinished fan-out: its branches' first
    nodes, a map's once; inside a subgraph node, paths such as
    ``review/score``); empty once the run succeeded. ``interrupts``: the
    pending interrupts. ``step``: the number of the last recorded step (0:
    none), as ``history`` numbers them.
    """

    values: dict
    status: RunStatus
    next: tuple[str, ...]
    interrupts: tuple[Interrupt, ...]
    step: int


class StepRecord(NamedTuple):
    """One recorded step of a run (``CompiledGraph.history``).

    ``step`` counts from 1 (step 0 is the run's input, node ``START``);
    ``node`` is the node's name, or its path inside a subgraph node
    (``review/score``); ``state`` is the state after it (after a fan-out's
    fan-in node: the state the fan-in made; inside a subgraph: the
    subgraph's own state); ``time`` is when it was recorded (seconds since
    the epoch).
    """

    step: int
    node: str
    state: dict
    time: float


@dataclass(frozen=True)
class RecordedRun:
    """What the database alone says of a run (``RunState`` but ``next``, which needs the
    graph), and its last recorded step (None: none; ``frames`` if it was inside a
    subgraph node)."""

    values: dict
    status: RunStatus
    interrupts: tuple[Interrupt, ...]
    step: int
    last: StepRow | None
    frames: list[dict] | None


def read_run(store: SqliteCheckpointer, run_id: str) -> RecordedRun:
    """Run ``run_id`` of ``store`` as the database records it; ``GraphError`` if unknown."""
    row, where = _run_row(store, run_id)
    last = store.last_step(run_id)
    interrupts = tuple(store.pending_interrupts(run_id))
    step, frames = (last.seq if last else 0), None
    if row.status == RunStatus.SUCCEEDED:
        values = decode_recorded_state(store, row.final_state, where, "final state")
    elif last is None:
        values = decode_recorded_state(store, row.input, where, "input state")
    elif last.kind == StepKind.SUBGRAPH:
        frames = _frames(store, last, where)
        values = frames[0]["state"]
    else:
        values = decode_recorded_state(store, last.state, where, f"state after node {last.node!r}")
    return RecordedRun(values, row.status, interrupts, step, last, frames)


def get_state(graph: HistoryGraph, run_id: str) -> RunState:
    """The run ``run_id`` of ``graph``'s checkpointer as it stands."""
    store = _store(graph, "get_state")
    run = read_run(store, run_id)
    if run.status == RunStatus.SUCCEEDED:
        nexts: tuple[str, ...] = ()
    else:
        nexts = _paused_nodes(run.interrupts)
        if not nexts and run.last is None:
            nexts = (graph.entry,)
        elif not nexts and run.last is not None:
            nexts = _NextNodes(store, run_id, run.last.seq).after(graph, run.last, run.values,
                                                                  run.frames)
    return RunState(run.values, run.status, nexts, run.interrupts, run.step)


def history(graph: HistoryGraph, run_id: str) -> list[StepRecord]:
    """The recorded steps of run ``run_id``, oldest first, its input first as step 0."""
    return recorded_history(_store(graph, "history"), run_id)


def recorded_history(store: SqliteCheckpointer, run_id: str) -> list[StepRecord]:
    """``history`` read from ``store`` alone."""
    row, where = _run_row(store, run_id)
    started = store.get_run(run_id)
    records = [StepRecord(0, START, decode_recorded_state(store, row.input, where, "input state"),
                          started.started_at if started is not None else 0.0)]
    for step in store.recorded_steps(run_id):
        records.append(StepRecord(step.seq, step.node, _step_state(store, step, where),
                                  step.recorded_at))
    return records


def fork(graph: HistoryGraph, run_id: str, step: int, update: Mapping[str, Any] | None = None,
         new_run_id: str | None = None) -> str:
    """Record a new run that starts from the state after ``step`` of run ``run_id``, with
    ``update`` merged in as if that step's node had returned it; its id.

    The new run is paused, to be continued with ``resume``; the original is
    only read. ``GraphError``: no such run, a step out of range, an update
    that is not a dict or breaks the state schema, a new id that exists
    (``RunExistsError``).
    """
    store = _store(graph, "fork")
    row, where = _run_row(store, run_id)
    new_id = fresh_run_id() if new_run_id is None else check_run_id(new_run_id)
    if update is not None and not isinstance(update, Mapping):
        raise GraphError(f"fork of {where}: update must be a dict, got {type(update).__name__}")
    steps = store.recorded_steps(run_id)
    last_seq = steps[-1].seq if steps else 0
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= last_seq:
        raise GraphError(f"fork of {where}: step {step!r} is out of range: its steps are "
                         f"0 (the input) to {last_seq}")
    input_text, state_text = row.input, None
    if step == 0:
        state = decode_recorded_state(store, row.input, where, "input state")
        input_text = _encode(store, _merged(graph, state, update, START, where), where)
    else:
        chosen = next(s for s in steps if s.seq == step)
        if chosen.kind == StepKind.SUBGRAPH:
            frames = _frames(store, chosen, where)
            inner = _inner_graph(graph, frames, where)
            frames[-1]["state"] = _merged(inner, frames[-1]["state"], update, chosen.node, where)
            state_text = _encode(store, frames, where)
        else:
            state = decode_recorded_state(store, chosen.state, where,
                                  f"state after node {chosen.node!r}")
            state_text = _encode(store, _merged(graph, state, update, chosen.node, where), where)
    store.fork_run(run_id, new_id, seq=step, input_text=input_text, state_text=state_text)
    return new_id


class _NextNodes:
    """Works out the nodes a resume runs next after the last recorded step ``seq``."""

    def __init__(self, store: SqliteCheckpointer, run_id: str, seq: int) -> None:
        self._store = store
        self._run_id = run_id
        self._seq = seq

    def after(self, graph: HistoryGraph, last: StepRow, values: dict,
              frames: list[dict] | None) -> tuple[str, ...]:
        if frames is None:
            return self._from(graph, last.node, values, prefix="")
        # Inside subgraph nodes: from the innermost step outwards, while a level is done.
        graphs = [graph]
        for frame in frames[:-1]:
            graphs.append(graphs[-1].nodes[frame["node"]].graph)
        state = frames[-1]["state"]
        for level in range(len(frames) - 1, -1, -1):
            prefix = PATH_SEPARATOR.join(frame["node"] for frame in frames[:level])
            prefix = prefix + PATH_SEPARATOR if prefix else ""
            found = self._from(graphs[level], frames[level]["node"], state, prefix=prefix)
            if found or level == 0:
                return found
            # The subgraph node of the level above has finished: its update merges there.
            parent = frames[level - 1]
            node = graphs[level - 1].nodes[parent["node"]]
            state = _merged(graphs[level - 1], dict(parent["state"]), node.update(state),
                            parent["node"], f"run {self._run_id!r}")
        return ()

    def _from(self, graph: HistoryGraph, node: str, state: dict, *, prefix: str
              ) -> tuple[str, ...]:
        """What runs after ``node`` of ``graph``, with ``state`` after it, named with
        ``prefix``; empty at END."""
        context = ExecutionContext(graph, fan_out_limits=BranchLimits())
        try:
            fan_out = graph.fan_out_of(node)
            if fan_out is not None:
                names = self._fan_out_next(fan_out, state, context)
            else:
                target = route(graph, node, state, context)
                names = () if target == END else (target,)
        finally:
            context.close()
        return tuple(prefix + name for name in names)

    def _fan_out_next(self, fan_out: Any, state: dict, context: ExecutionContext
                      ) -> tuple[str, ...]:
        total = self._store.fan_out_total(self._run_id, self._seq)
        done = {position for position, _ in
                self._store.successful_branches(self._run_id, self._seq)} if total else set()
        if isinstance(fan_out, MapFanOut):
            if total is None:
                total = len(map_items(fan_out, state, context))
            return (fan_out.target,) if len(done) < total else (fan_out.fan_in,)
        left = tuple(dict.fromkeys(target for position, target in enumerate(fan_out.targets)
                                   if position not in done))
        return left or (fan_out.fan_in,)


def _store(graph: HistoryGraph, what: str) -> SqliteCheckpointer:
    if graph.checkpointer is None:
        raise GraphError(f"{what}() needs a checkpointer: compile(checkpointer="
                         f"SqliteCheckpointer(path)) or YAML settings.checkpoint")
    return graph.checkpointer


def _run_row(store: SqliteCheckpointer, run_id: str) -> tuple[RunRow, str]:
    check_run_id(run_id)
    where = f"run {run_id!r} in {str(store.path)!r}"
    row = store.load_run(run_id)
    if row is None:
        raise GraphError(f"{where}: there is no such run")
    return row, where


def _paused_nodes(interrupts: Sequence[Interrupt]) -> tuple[str, ...]:
    """The nodes that run again first when a paused run resumes: each interrupted node
    (in a branch, by its path), and a node a breakpoint paused before. A breakpoint after
    a node names none: what follows it comes from the graph."""
    return tuple(dict.fromkeys(interrupt.node for interrupt in interrupts
                               if interrupt.breakpoint is not Breakpoint.AFTER))


def _frames(store: SqliteCheckpointer, step: StepRow | RecordedStep, where: str) -> list[dict]:
    """The frames of an inner step, from the main path in (see ``recorder.inner_step``)."""
    frames = decode_recorded(store, step.state, where, f"state after node {step.node!r}")
    if not (isinstance(frames, list) and frames and all(
            isinstance(f, dict) and isinstance(f.get("node"), str)
            and isinstance(f.get("state"), dict) for f in frames)):
        raise GraphError(f"{where}: the recorded state after node {step.node!r} is not a "
                         f"list of subgraph frames")
    return frames


def _step_state(store: SqliteCheckpointer, step: RecordedStep, where: str) -> dict:
    if step.kind == StepKind.SUBGRAPH:
        return _frames(store, step, where)[-1]["state"]
    return decode_recorded_state(store, step.state, where, f"state after node {step.node!r}")


def _inner_graph(graph: HistoryGraph, frames: list[dict], where: str) -> HistoryGraph:
    """The graph the last of ``frames`` is a step of (the main path's frame first)."""
    for frame in frames[:-1]:
        node = graph.nodes.get(frame["node"])
        if not isinstance(node, SubgraphNode):
            raise GraphError(f"{where}: node {frame['node']!r} is not a subgraph node of "
                             f"this graph")
        graph = node.graph
    return graph


def _merged(graph: HistoryGraph, state: dict, update: Mapping[str, Any] | None, node: str,
            where: str) -> dict:
    """``state`` with ``update`` merged in by ``graph``'s schema, as if ``node`` returned it."""
    if update:
        context = ExecutionContext(graph, fan_out_limits=BranchLimits())
        try:
            graph.schema.apply(state, update, node=node, context=context)
        except GraphExecutionError as exc:  # a declared type or reducer refused the update
            raise GraphError(f"{where}: the update cannot be merged after node {node!r}: "
                             f"{exc}") from exc
        finally:
            context.close()
    return state


def _encode(store: SqliteCheckpointer, value: Any, where: str) -> str:
    try:
        return encode_value(value, allow_pickle=store.pickle, path="state")
    except StateEncodeError as exc:
        raise GraphError(f"fork of {where}: the new state cannot be checkpointed: {exc}"
                         ) from exc
