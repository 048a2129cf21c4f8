"""Recording one run as it happens, and the point a resumed run continues from.

The runner calls a ``RunRecorder`` at three moments of the main path: after
each step (``step``), as each branch of a fan-out finishes (``fan_out_started``
then ``branch_done``) and when the run ends (``finished``). A branch's own
nested fan-outs are never recorded.

Steps are committed before the runner goes on. Branch results are encoded
at once (so nothing the fan-in node does to them later changes what is
stored) and committed by a writer thread that puts every result queued
while it was writing into one transaction: a result may be recorded a few
milliseconds late, never wrongly, and a kill in between loses only results
that were not yet recorded, whose branches then run again on resume.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, fields
from typing import Any

from ..branch import ParallelFlowResult
from ..errors import GraphExecutionError
from .codec import StateDecodeError, StateEncodeError, decode_value, encode_value
from .store import RunStatus, SqliteCheckpointer, StepKind

_RESULT_FIELDS = tuple(f.name for f in fields(ParallelFlowResult))


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after ``node`` (its fan-out, if it has one, comes next)."""

    node: str
    after_fan_in: bool
    steps: int


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
        self._writer = _BranchWriter(store)

    def encode(self, value: Any, path: str, what: str, **where: Any) -> str:
        """``value`` as stored text; a value that cannot be stored fails the run, naming ``path``."""
        try:
            return encode_value(value, allow_pickle=self.store.pickle, path=path)
        except StateEncodeError as exc:
            raise GraphExecutionError(
                f"run {self.run_id!r}: cannot checkpoint {what}: {exc}",
                error_type="StateEncodeError", run_id=self.run_id, **where) from exc

    def step(self, node: str, state: dict, steps: int, kind: StepKind) -> None:
        """Commit the state after main-path step ``node``."""
        text = self.encode(state, "state", f"the state after node {node!r}", node=node,
                           state=dict(state))
        self._writer.flush()
        self._seq += 1
        self.store.write_step(self.run_id, self._seq, node, kind, steps, text)

    def fan_out_started(self, node: str, total: int) -> dict[int, ParallelFlowResult]:
        """Record the fan-out after the last step; the successful results already recorded
        for it (only when it is the fan-out a resume continues), by position."""
        self.store.write_fan_out(self.run_id, self._seq, node, total)
        if self._resumed_seq is None or self._resumed_seq != self._seq:
            return {}
        self._resumed_seq = None
        reused = {}
        for position, text in self.store.successful_branches(self.run_id, self._seq):
            if 0 <= position < total:
                reused[position] = self._decode_result(text, node, position)
        return reused

    def branch_done(self, node: str, position: int, result: ParallelFlowResult) -> None:
        """Queue the final result of branch ``position`` of the fan-out after the last step."""
        record = {name: getattr(result, name) for name in _RESULT_FIELDS}
        text = self.encode(record, f"result of branch {result.branch!r}",
                           f"the result of branch {result.branch!r}", node=node,
                           branch=result.branch)
        self._writer.put((self.run_id, self._seq, position, bool(result.success), text))

    def finished(self, status: RunStatus, state: dict | None = None,
                 error: str | None = None) -> None:
        """Record how the run ended (after every queued branch result)."""
        try:
            self._writer.close()
        finally:
            final = None
            if state is not None:
                final = self.encode(state, "state", "the final state")
            self.store.finish_run(self.run_id, status, final, error)

    def abandon(self) -> None:
        """Stop the writer thread without recording anything more."""
        self._writer.close(write=False)

    def _decode_result(self, text: str, node: str, position: int) -> ParallelFlowResult:
        try:
            record = decode_value(text, allow_pickle=self.store.pickle)
            if not isinstance(record, dict):
                raise StateDecodeError("not a branch result")
            return ParallelFlowResult(**{k: v for k, v in record.items() if k in _RESULT_FIELDS})
        except (StateDecodeError, TypeError) as exc:
            raise GraphExecutionError(
                f"run {self.run_id!r}: the recorded result of branch {position} of the fan-out "
                f"from node {node!r} in {str(self.store.path)!r} is unreadable: {exc}",
                node=node, error_type="StateDecodeError", run_id=self.run_id) from exc


class _BranchWriter:
    """Commits queued branch results on a thread of its own, all queued ones in one go."""

    def __init__(self, store: SqliteCheckpointer) -> None:
        self._store = store
        self._changed = threading.Condition()
        self._pending: list[tuple[str, int, int, bool, str]] = []
        self._writing = False
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def put(self, row: tuple[str, int, int, bool, str]) -> None:
        with self._changed:
            self._raise_error()
            self._pending.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="isobranch-checkpoint",
                                                daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every queued result is committed; raise a write's error."""
        with self._changed:
            while (self._pending or self._writing) and self._error is None:
                self._changed.wait()
            self._raise_error()

    def close(self, *, write: bool = True) -> None:
        """Commit what is queued (unless ``write`` is False), then end the thread."""
        with self._changed:
            if not write:
                self._pending.clear()
            self._closing = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._changed:
            self._thread = None
            self._closing = False
            if write:
                self._raise_error()

    def _raise_error(self) -> None:
        # Sticky: once a write failed, no later result is queued or waited for.
        if self._error is not None:
            self._pending.clear()
            raise self._error

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending or self._error is not None:
                    return
                batch, self._pending = self._pending, []
                self._writing = True
            try:
                self._store.write_branches(batch)
            except BaseException as exc:  # reported to the runner by put/flush/close
                with self._changed:
                    self._error = exc
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()
