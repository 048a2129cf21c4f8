"""Recording one run as it happens, and the point a resumed run continues from.

The runner calls a ``RunRecorder`` after each step of the main path
(``step``) and when the run ends (``finished``); for each main-path fan-out
it makes a ``FanOutRecording`` (``fan_out``), which observes the fan-out
driver and records each branch as it finishes. A branch's own nested
fan-outs are never recorded.

Steps are committed before the runner goes on. Branch results are queued
for a writer thread, which encodes them and commits the results that
finish within ``_GATHER_SECONDS`` of each other in one transaction, while
the runner waits for the next branch: a result may be recorded that much
late, never wrongly, and a kill in between loses only results that were
not yet recorded, whose branches then run again on resume. The writer,
not the runner, encodes: a batch encoded in one loop costs the process
less CPU than each result encoded on the runner's thread between its
other work (measured on a process map), and the runner's thread is the
one a fan-out waits on. A result that cannot be encoded is left out and
fails the run; the batch's other results are committed all the same.
The fan-out waits for the writer before the fan-in node runs
(``fan_out_finished``), so nothing the fan-in node does to the results
can change what is stored.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from operator import attrgetter
from typing import Any

from ..branch import ParallelFlowResult
from ..errors import GraphError, GraphExecutionError, StateDecodeError, StateEncodeError
from ..interrupts import Interrupt
from .codec import decode_value, encode_value
from .store import RunStatus, SqliteCheckpointer, StepKind

_RESULT_FIELDS = frozenset(f.name for f in fields(ParallelFlowResult))
# Fields left at their defaults are not stored (most of them, for a success): an
# empty list or dict made by a default factory counts as its default too. A field
# without any default compares unequal to the marker, so it always is stored.
_NO_DEFAULT = object()
_FIELD_NAMES = tuple(f.name for f in fields(ParallelFlowResult))
_FIELD_DEFAULTS = tuple(f.default if f.default is not MISSING
                        else f.default_factory() if f.default_factory is not MISSING
                        else _NO_DEFAULT for f in fields(ParallelFlowResult))
# Every field of a result at once, as a tuple in _FIELD_NAMES order (one C call, where a
# getattr per field is most of what building a small result's record costs).
_field_values = attrgetter(*_FIELD_NAMES)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``node``, a node or a fan-in node (its fan-out,
    if it has one, comes next; otherwise its edges).

    ``inner``: the run stopped inside subgraph node ``node`` (its step
    ``steps``), which runs again from ``inner``, the point in its own steps,
    whose ``state`` is the inner graph's state there. ``again``: ``node``
    itself runs next (a branch that paused in it), not what follows it.
    """

    node: str
    steps: int
    inner: ResumePoint | None = None
    state: dict | None = None
    again: bool = False

    def to_record(self) -> dict[str, Any]:
        """The point as plain data (what the checkpoint codec stores)."""
        return {"node": self.node, "steps": self.steps, "state": self.state,
                "again": self.again,
                "inner": None if self.inner is None else self.inner.to_record()}

    @classmethod
    def from_record(cls, record: Any) -> ResumePoint:
        """A point from ``to_record``'s plain data; ``ValueError`` if it is not one."""
        if not (isinstance(record, dict) and isinstance(record.get("node"), str)
                and isinstance(record.get("steps"), int)):
            raise ValueError("not a recorded resume point")
        inner = record.get("inner")
        return cls(record["node"], record["steps"],
                   inner=None if inner is None else cls.from_record(inner),
                   state=record.get("state"), again=bool(record.get("again")))


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex[:16]


class RunRecorder:
    """Records the steps and branch results of one run in a ``SqliteCheckpointer``."""

    def __init__(self, store: SqliteCheckpointer, run_id: str, *, seq: int = 0,
                 resumed_seq: int | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self._seq = seq
        self._resumed_seq = resumed_seq
        self._writer = _BranchWriter(store, self.encode_result, self.failure)

    def encode(self, value: Any, path: str, what: str, **where: Any) -> str:
        """``value`` as stored text; a value that cannot be stored fails the run, naming ``path``."""
        try:
            return encode_value(value, allow_pickle=self.store.pickle, path=path)
        except StateEncodeError as exc:
            raise self._cannot_store(what, exc, **where) from exc

    def _cannot_store(self, what: str, exc: StateEncodeError, **where: Any
                      ) -> GraphExecutionError:
        return GraphExecutionError(f"run {self.run_id!r}: cannot checkpoint {what}: {exc}",
                                   error_type="StateEncodeError", run_id=self.run_id, **where)

    def failure(self, what: str, exc: BaseException, node: str | None = None
                ) -> GraphExecutionError:
        """The error that ends the run when recording ``what`` failed (the database broke)."""
        return GraphExecutionError(f"run {self.run_id!r}: recording {what} failed: {exc}",
                                   node=node, error_type=type(exc).__name__, run_id=self.run_id)

    def step(self, node: str, state: dict, steps: int, *, fan_in: bool) -> None:
        """Commit the state after main-path step ``node`` (``fan_in``: a fan-in node ran)."""
        kind = StepKind.FAN_IN if fan_in else StepKind.NODE
        text = self.encode(state, "state", f"the state after node {node!r}", node=node,
                           state=dict(state))
        self._writer.flush()
        self._seq += 1
        try:
            self.store.write_step(self.run_id, self._seq, node, kind, steps, text)
        except GraphError as exc:
            raise self.failure(f"the step of node {node!r}", exc, node) from exc

    def fan_out(self, node: str, total: int) -> FanOutRecording:
        """Record the fan-out of ``node`` after the last step; what records its branches."""
        return FanOutRecording(self, node, *self.fan_out_started(node, total))

    def paused(self, interrupts: list[Interrupt]) -> None:
        """Record that the run waits for answers to ``interrupts`` (after every queued branch
        result); a value that cannot be stored fails the run, naming its node."""
        records = [(i.id, self.encode(i.to_record(), f"interrupt {i.id!r}",
                                      f"the value of interrupt {i.id!r}", node=i.node,
                                      branch=i.branch)) for i in interrupts]
        try:
            self._writer.close()
        finally:
            try:
                self.store.finish_run(self.run_id, RunStatus.INTERRUPTED, None, None, records)
            except GraphError as exc:
                raise self.failure("the pause of the run", exc) from exc

    def inside(self, node: str, state: dict, steps: int) -> SubgraphRecording:
        """What records the inner steps of subgraph node ``node``, its step ``steps``, which
        starts from the main-path state ``state``."""
        return SubgraphRecording(self, (), (), node, state, steps)

    def inner_step(self, path: str, frames: list[str], steps: int) -> None:
        """Commit step ``steps`` inside a subgraph: ``frames`` are the encoded frames from the
        main path in (``subgraph_frame``), the last one the inner step's own; ``path`` names it."""
        self._writer.flush()
        self._seq += 1
        try:
            self.store.write_step(self.run_id, self._seq, path, StepKind.SUBGRAPH, steps,
                                  "[" + ",".join(frames) + "]")
        except GraphError as exc:
            raise self.failure(f"the step of node {path!r}", exc, path) from exc

    def fan_out_started(self, node: str, total: int
                        ) -> tuple[dict[int, ParallelFlowResult], dict[int, ParallelFlowResult]]:
        """Record the fan-out after the last step; the successful results already recorded
        for it and the results of its branches that paused (only when it is the fan-out a
        resume continues), each by position."""
        resumed = self._resumed_seq == self._seq
        try:
            self.store.write_fan_out(self.run_id, self._seq, node, total)
            recorded = self.store.successful_branches(self.run_id, self._seq) if resumed else []
            paused = self.store.paused_branches(self.run_id, self._seq) if resumed else []
        except GraphError as exc:
            raise self.failure(f"the fan-out from node {node!r}", exc, node) from exc
        self._resumed_seq = None  # only the first fan-out of a resumed run reuses results
        return ({position: self._decode_result(text, node, position)
                 for position, text in recorded if 0 <= position < total},
                {position: self._decode_result(text, node, position)
                 for position, text in paused if 0 <= position < total})

    def branch_done(self, node: str, position: int, result: ParallelFlowResult) -> None:
        """Encode the final result of branch ``position`` of the fan-out after the last step
        and queue it for the writer; a result that cannot be stored fails the run here."""
        self._writer.put((node, self._seq, position, result))

    def fan_out_done(self) -> None:
        """Wait until every result of the fan-out is committed (before its fan-in node runs)."""
        self._writer.flush()

    def encode_result(self, node: str, seq: int, position: int, result: ParallelFlowResult
                      ) -> tuple[str, int, int, bool, str, bool]:
        """A branch result as its database row."""
        record = {name: value for name, value, default
                  in zip(_FIELD_NAMES, _field_values(result), _FIELD_DEFAULTS, strict=True)
                  if value is not default and value != default}
        if result.interrupts:  # plain data for the codec; a resume rebuilds them
            record["interrupts"] = [i.to_record() for i in result.interrupts]
            record["resume_at"] = (None if result.resume_at is None
                                   else result.resume_at.to_record())
        try:  # (the error's words are made only when it happens: this runs per branch)
            text = encode_value(record, allow_pickle=self.store.pickle, path="result")
        except StateEncodeError as exc:
            raise self._cannot_store(f"the result of branch {result.branch!r}", exc,
                                     node=node, branch=result.branch) from exc
        return self.run_id, seq, position, bool(result.success), text, result.paused

    def finished(self, status: RunStatus, state: dict | None = None,
                 error: str | None = None) -> None:
        """Record how the run ended (after every queued branch result)."""
        try:
            self._writer.close()
        finally:
            final = None
            if state is not None:
                final = self.encode(state, "state", "the final state")
            try:
                self.store.finish_run(self.run_id, status, final, error)
            except GraphError as exc:
                raise self.failure("the end of the run", exc) from exc

    def _decode_result(self, text: str, node: str, position: int) -> ParallelFlowResult:
        try:
            record = decode_value(text, allow_pickle=self.store.pickle)
            if not isinstance(record, dict):
                raise StateDecodeError("not a branch result")
            fields_ = {k: v for k, v in record.items() if k in _RESULT_FIELDS}
            if fields_.get("interrupts"):
                fields_["interrupts"] = tuple(map(Interrupt.from_record, fields_["interrupts"]))
                point = fields_.get("resume_at")
                fields_["resume_at"] = None if point is None else ResumePoint.from_record(point)
            return ParallelFlowResult(**fields_)
        except (StateDecodeError, ValueError, TypeError, RecursionError) as exc:
            raise GraphExecutionError(
                f"run {self.run_id!r}: the recorded result of branch {position} of the fan-out "
                f"from node {node!r} in {str(self.store.path)!r} is unreadable: {exc}",
                node=node, error_type="StateDecodeError", run_id=self.run_id) from exc


class SubgraphRecording:
    """Records the steps and fan-outs inside one run of a main-path subgraph node.

    Each inner step is stored with its frames, from the main path in: the
    node and step of each enclosing subgraph node with the state it started
    from (encoded once, when it started), then the inner step's own, so a
    resume continues inside the subgraph with every level's state.
    """

    def __init__(self, root: RunRecorder, names: tuple[str, ...], frames: tuple[str, ...],
                 node: str, state: dict, steps: int) -> None:
        self._root = root
        self._names = (*names, node)
        self._prefix = "/".join(self._names) + "/"
        text = root.encode(state, "state", f"the state subgraph node {node!r} starts from",
                           node=node, state=dict(state))
        self._frames = (*frames, subgraph_frame(node, steps, text))

    def step(self, node: str, state: dict, steps: int, *, fan_in: bool) -> None:
        """Commit the inner state after inner step ``node``."""
        path = self._prefix + node
        text = self._root.encode(state, "state", f"the state after node {path!r}", node=path,
                                 state=dict(state))
        del fan_in  # a resume continues after an inner step either way
        self._root.inner_step(path, [*self._frames, subgraph_frame(node, steps, text)], steps)

    def fan_out(self, node: str, total: int) -> FanOutRecording:
        """Record the fan-out of inner node ``node`` after the last step."""
        return self._root.fan_out(self._prefix + node, total)

    def inside(self, node: str, state: dict, steps: int) -> SubgraphRecording:
        """What records the steps of subgraph node ``node`` nested in this subgraph."""
        return SubgraphRecording(self._root, self._names, self._frames, node, state, steps)


def subgraph_frame(node: str, steps: int, state_text: str) -> str:
    """One level of an inner step's record: ``{"node", "steps", "state"}`` as JSON text."""
    return (f'{{"node": {json.dumps(node)}, "steps": {int(steps)}, '
            f'"state": {state_text}}}')


def resume_point(frames: Any) -> tuple[dict, ResumePoint]:
    """The main-path state and resume point of a recorded inner step's decoded ``frames``.

    ``ValueError`` if they are not what ``inner_step`` records.
    """
    if not isinstance(frames, list) or len(frames) < 2:
        raise ValueError("not a list of subgraph frames")
    point: ResumePoint | None = None
    for frame in reversed(frames):
        if not (isinstance(frame, dict) and isinstance(frame.get("node"), str)
                and isinstance(frame.get("steps"), int) and isinstance(frame.get("state"), dict)):
            raise ValueError("a subgraph frame is not {node, steps, state}")
        point = ResumePoint(frame["node"], frame["steps"], inner=point, state=frame["state"])
    assert point is not None
    return point.state or {}, replace(point, state=None)


class FanOutRecording:
    """Records the branch results of one fan-out as the driver reports them (an observer).

    ``recorded`` are the successful results a resumed run already has for
    it, by position: those branches do not run again. ``paused`` are the
    results of its branches that paused, by position: those branches
    continue from where they paused.
    """

    def __init__(self, recorder: RunRecorder, node: str,
                 recorded: dict[int, ParallelFlowResult],
                 paused: dict[int, ParallelFlowResult] | None = None) -> None:
        self._recorder = recorder
        self._node = node
        self.recorded = recorded
        self.paused = paused or {}

    def branch_finished(self, position: int, result: ParallelFlowResult) -> None:
        """Queue the final result of branch ``position`` for the writer."""
        self._recorder.branch_done(self._node, position, result)

    def fan_out_finished(self) -> None:
        """Wait until every result is committed (before the fan-in node runs)."""
        self._recorder.fan_out_done()


class _BranchWriter:
    """Commits queued branch results on a thread of its own, all queued ones in one go.

    The queue is a ``SimpleQueue``: putting a result costs the runner well
    under a microsecond and takes no lock the writer holds while it works.
    After the first result of a batch the writer waits ``_GATHER_SECONDS``
    for the results that finish right after it, so a fast map commits one
    transaction per ``_GATHER_SECONDS`` instead of one per branch (and wakes
    the writer as rarely); ``flush`` and ``close`` cut that wait short.
    """

    def __init__(self, store: SqliteCheckpointer,
                 encode: Callable[[str, int, int, ParallelFlowResult],
                                  tuple[str, int, int, bool, str, bool]],
                 failure: Callable[[str, BaseException], GraphExecutionError]) -> None:
        self._store = store
        self._encode = encode
        self._failure = failure
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._hurry = threading.Event()  # set by flush/close: commit what is queued now
        self._error: BaseException | None = None
        self._database_failed = False  # after a failed write nothing more is written
        self._thread: threading.Thread | None = None

    def put(self, entry: tuple[str, int, int, ParallelFlowResult]) -> None:
        """Queue one result (fan-out node, step, position, result) to encode and commit;
        raise the error of an earlier result or write, if one failed."""
        self._raise_error()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="isobranch-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._queue.put(entry)

    def flush(self) -> None:
        """Wait until every queued result is committed; raise a write's error."""
        if self._thread is not None:
            written = threading.Event()
            self._hurry.set()
            self._queue.put(written)
            while not written.wait(0.1):
                if not self._thread.is_alive():  # never wait for a writer that is gone
                    break
        self._raise_error()

    def close(self) -> None:
        """Commit what is queued, then end the thread; raise a write's error."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._hurry.set()
            self._queue.put(_STOP)
            thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        # Sticky: once a write failed, every later put, flush and close says so.
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            batch, signals = [self._queue.get()], []
            if isinstance(batch[0], tuple):
                self._hurry.wait(_GATHER_SECONDS)
            self._hurry.clear()
            try:
                while True:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            rows = []
            for entry in batch:
                if isinstance(entry, tuple):
                    rows.append(entry)
                else:
                    signals.append(entry)
            if rows and not self._database_failed:
                self._write(rows)
            for signal in signals:
                if isinstance(signal, threading.Event):
                    signal.set()
            if _STOP in signals:
                return


    def _write(self, entries: list[tuple[str, int, int, ParallelFlowResult]]) -> None:
        """Encode and commit ``entries``. A result that cannot be encoded is left out and
        its error kept for the runner; the others are committed all the same, so every
        result the run reports as a success is recorded (the run fails on that error)."""
        rows = []
        for entry in entries:
            try:
                rows.append(self._encode(*entry))
            except GraphExecutionError as exc:  # this result cannot be stored
                if self._error is None:
                    self._error = exc
        if not rows:
            return
        try:
            self._store.write_branches(rows)
        except BaseException as exc:  # reported to the runner by put/flush/close
            self._database_failed = True
            if self._error is None:
                self._error = self._failure("branch results", exc)

# What close() puts in the queue: stop after writing what came before.
_STOP = "stop"
# How long the writer lets results gather before it commits them: each commit costs
# the caller's process ~40 us of SQLite and thread wake-ups, so a map of fast
# branches commits every 10 ms, not every few results (docs/durable-runs.md says so).
_GATHER_SECONDS = 0.01
