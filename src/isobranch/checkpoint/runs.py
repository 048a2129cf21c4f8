"""Starting a recorded run and reopening one to resume it."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import GraphChangedError, GraphError, StateDecodeError, StateEncodeError
from ..interrupts import Breakpoint
from .answering import NO_ANSWER, answers_for
from .codec import decode_value, encode_value
from .fingerprint import describe_changes, fingerprint_text
from .recorder import ResumePoint, RunRecorder, new_run_id, resume_point
from .store import RunRow, RunStatus, SqliteCheckpointer, StepKind


def check_run_id(run_id: Any) -> str:
    """``run_id`` if it is usable as a run id; ``GraphError`` otherwise."""
    if not isinstance(run_id, str) or not run_id.strip() or len(run_id) > 200 or any(
            ord(c) < 32 for c in run_id):
        raise GraphError(f"run_id must be a non-empty string of at most 200 printable "
                         f"characters, got {run_id!r}")
    return run_id


def begin_run(store: SqliteCheckpointer, state: dict, run_id: str | None, *,
              graph_name: str | None, fingerprint: dict[str, str]) -> RunRecorder:
    """Record a new run on ``state`` of the graph named ``graph_name`` with ``fingerprint``.

    ``GraphError`` if ``run_id`` exists or the state cannot be recorded.
    """
    run_id = new_run_id() if run_id is None else check_run_id(run_id)
    try:
        input_text = encode_value(state, allow_pickle=store.pickle, path="state")
    except StateEncodeError as exc:
        raise GraphError(f"run {run_id!r}: the input state cannot be checkpointed: {exc}"
                         ) from exc
    store.create_run(run_id, graph_name, fingerprint_text(fingerprint), input_text)
    return RunRecorder(store, run_id)


@dataclass
class Reopened:
    """A run reopened for resuming: its recorder, state and the point to continue from.

    ``point`` is None when no step was recorded (the run starts over from
    its input); ``done`` is True for a run that had succeeded (``state`` is
    then its final state, and nothing runs). ``answers`` are every answer
    given to the run's interrupts, by id (this resume's too), and ``passed``
    the main-path node the run paused before or in, which runs next: its
    before-breakpoint is not hit again.
    """

    recorder: RunRecorder | None
    state: dict
    point: ResumePoint | None
    done: bool
    answers: dict[str, Any] = field(default_factory=dict)
    passed: str | None = None


def reopen_run(store: SqliteCheckpointer, run_id: str, *, fingerprint: dict[str, str],
               nodes: Collection[str], force: bool, answer: Any = NO_ANSWER,
               answers: Mapping[str, Any] | None = None) -> Reopened:
    """Reopen ``run_id`` to resume it with the graph of ``fingerprint`` and ``nodes`` (the
    path of every node, ``review/score`` inside subgraph node ``review``).

    ``answer``/``answers`` answer the interrupts an interrupted run waits
    for (``answering.answers_for``).

    ``GraphError`` if it cannot be: no such run, an unreadable record, a
    graph changed since the run started (``GraphChangedError``, unless
    ``force``), a last recorded step at a node the graph no longer has,
    answers that do not fit what the run waits for.
    """
    check_run_id(run_id)
    row = store.load_run(run_id)
    where = f"run {run_id!r} in {str(store.path)!r}"
    if row is None:
        raise GraphError(f"{where}: there is no such run")
    pending = store.pending_interrupts(run_id) if row.status == RunStatus.INTERRUPTED else []
    given = answers_for(run_id, pending, answer, answers)
    if row.status == RunStatus.SUCCEEDED:
        return Reopened(None, decode_recorded_state(store, row.final_state, where, "final state"), None, True)
    changes = describe_changes(row.fingerprint, fingerprint)
    if changes and not force:
        raise GraphChangedError(run_id, store.path, changes)
    state, point, seq = recorded_point(store, run_id, row, nodes)
    answer_texts = []
    for id_, value in given.items():
        try:
            answer_texts.append((id_, encode_value(value, allow_pickle=store.pickle,
                                                   path=f"answer to {id_!r}")))
        except StateEncodeError as exc:
            raise GraphError(f"{where}: the answer to interrupt {id_!r} cannot be "
                             f"checkpointed: {exc}") from exc
    store.reopen_run(run_id, fingerprint_text(fingerprint) if changes else None, answer_texts)
    recorder = RunRecorder(store, run_id, seq=seq, resumed_seq=seq if point else None)
    all_answers = {id_: decode_recorded(store, text, where, f"answer to {id_!r}")
                   for id_, text in store.answer_records(run_id).items()}
    # The main-path node the run paused before or in runs next: its before-breakpoint
    # (if any) is passed once, not hit again.
    passed = next((i.node.split("/")[0] for i in pending
                   if i.branch is None and i.breakpoint != Breakpoint.AFTER), None)
    return Reopened(recorder, state, point, False, all_answers, passed)


def recorded_point(store: SqliteCheckpointer, run_id: str, row: RunRow,
                   nodes: Collection[str] | None = None
                   ) -> tuple[dict, ResumePoint | None, int]:
    """The main-path state after run ``run_id``'s last recorded step (its input if none),
    the point a resume continues from, and the step's sequence number.

    With ``nodes`` (every node path of the graph), a last step at a node the
    graph no longer has is a ``GraphError``.
    """
    where = f"run {run_id!r} in {str(store.path)!r}"
    last = store.last_step(run_id)
    if last is None:
        state, point, seq = decode_recorded_state(store, row.input, where, "input state"), None, 0
    else:
        if nodes is not None and last.node not in nodes:
            raise GraphError(f"{where}: its last recorded step is node {last.node!r}, which "
                             f"the graph no longer has")
        if last.kind == StepKind.SUBGRAPH:
            frames = decode_recorded(store, last.state, where, f"state after node {last.node!r}")
            try:
                state, point = resume_point(frames)
            except ValueError as exc:
                raise GraphError(f"{where}: the recorded state after node {last.node!r} is "
                                 f"unreadable: {exc}") from exc
        else:
            state = decode_recorded_state(store, last.state, where, f"state after node {last.node!r}")
            point = ResumePoint(last.node, last.steps)
        seq = last.seq
    return state, point, seq


def paused_state(store: SqliteCheckpointer, run_id: str) -> dict:
    """The main-path state of run ``run_id`` as of its pause: the state a resume continues
    from (what the interrupted node did before it paused does not count)."""
    row = store.load_run(run_id)
    if row is None:
        raise GraphError(f"run {run_id!r} in {str(store.path)!r}: there is no such run")
    return recorded_point(store, run_id, row)[0]


def decode_recorded(store: SqliteCheckpointer, text: str | None, where: str, what: str) -> Any:
    """A recorded value of ``store``; a ``GraphError`` naming ``where`` and ``what`` if unreadable."""
    try:
        return decode_value(text if text is not None else "null", allow_pickle=store.pickle)
    except (StateDecodeError, ValueError, TypeError, RecursionError) as exc:  # tampered, damaged
        raise GraphError(f"{where}: the recorded {what} is unreadable: {exc}") from exc


def decode_recorded_state(store: SqliteCheckpointer, text: str | None, where: str, what: str
                          ) -> dict:
    """A recorded state (a dict) of ``store``; a ``GraphError`` if unreadable or not a state."""
    value = decode_recorded(store, text, where, what)
    if not isinstance(value, dict):
        raise GraphError(f"{where}: the recorded {what} is not a state (a dict)")
    return value
