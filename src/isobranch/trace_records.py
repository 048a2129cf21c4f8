"""Spans as plain data: what a branch records wherever it runs, sent back with its result.

A branch in a worker process or on a Dask worker has no exporter of its
own (and need not have OpenTelemetry installed): ``SpanRecorder`` notes its
spans — the branch, its nodes, its own fan-outs and their branches — as
``SpanRecord`` tuples of ids, times, attributes and status, and they travel
back in ``ParallelFlowResult.spans``. The caller (tracing.py) re-emits them
through its own tracer provider, children of the fan-out span whose
``TraceParent`` the branch's task carried. With tracing off a task carries
no ``TraceParent``, nothing is recorded, and ``spans`` stays empty.

``Spans`` is what the step loop asks of either side: the caller's live
spans (tracing.py) on the main path, a ``SpanRecorder`` in a branch.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from .branch import ParallelFlowResult


class SpanName:
    """The names of isobranch's spans (plain strings: a span is made per node and branch)."""

    RUN: Final = "isobranch.run"
    NODE: Final = "isobranch.node"
    FAN_OUT: Final = "isobranch.fan_out"
    BRANCH: Final = "isobranch.branch"


class Attr:
    """The attribute keys of isobranch's spans (plain strings, as for ``SpanName``)."""

    GRAPH: Final = "isobranch.graph"
    RUN_ID: Final = "isobranch.run_id"
    NODE: Final = "isobranch.node"  # a node's name (a fan-out's: the node it starts from)
    FAN_IN: Final = "isobranch.fan_in"
    BRANCH: Final = "isobranch.branch"  # the branch's full name: "score[3]", "outer[1]/inner[3]"
    INDEX: Final = "isobranch.index"  # a map branch's item index
    ISOLATION: Final = "isobranch.isolation"
    WORKER: Final = "isobranch.worker"  # a thread's name, a process id, a Dask worker's address
    WORKER_PID: Final = "isobranch.worker.pid"
    WORKER_HOST: Final = "isobranch.worker.host"
    ATTEMPT: Final = "isobranch.attempt"
    CACHED: Final = "isobranch.cached"
    ERROR_TYPE: Final = "isobranch.error_type"
    TIMED_OUT: Final = "isobranch.timed_out"
    TOTAL: Final = "isobranch.branches.total"
    SUCCEEDED: Final = "isobranch.branches.succeeded"
    FAILED: Final = "isobranch.branches.failed"


# The event a node span gets before each retry of the node.
RETRY_EVENT = "isobranch.retry"


@dataclass(frozen=True, slots=True)
class TraceParent:
    """The span a branch's spans go under (its fan-out's), as its task carries it."""

    trace_id: int
    span_id: int


@dataclass(slots=True)
class SpanRecord:
    """One finished span as plain data (picklable; no OpenTelemetry object in it).

    Times are ``time.time_ns()`` where the span ran. ``error`` is the
    description of an error status (None: the span did not fail).
    ``events`` are ``(name, time_ns, attributes)`` (a tuple: most spans have
    none, and an empty tuple costs no allocation).
    """

    name: str
    trace_id: int
    span_id: int
    parent_id: int
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    events: tuple[tuple[str, int, dict[str, Any]], ...] = ()


def new_span_id() -> int:
    """A random non-zero 64-bit span id (Python reseeds ``random`` in a forked child)."""
    return random.getrandbits(64) or 1


@functools.cache
def host_name() -> str:
    """This machine's name, for the worker attributes of a branch span."""
    return socket.gethostname()


@functools.cache
def process_id() -> int:
    """This process's id, asked once per process (a forked child asks again)."""
    return os.getpid()


os.register_at_fork(after_in_child=process_id.cache_clear)


def error_type(error: BaseException) -> str:
    """What a span names as the error type: the library's own (``BranchTimeout`` ...), else
    the exception's class."""
    return getattr(error, "error_type", None) or type(error).__name__


def error_status(error: BaseException) -> str:
    """The description of an error status for ``error``."""
    return f"{error_type(error)}: {error}"


class Spans(Protocol):
    """What the step loop tells whoever traces a path: the caller's live spans or a branch's
    recorder. A handle returned by a ``*_started`` method goes back to the matching
    ``*_ended`` one."""

    def node_started(self, node: str) -> Any:
        """Node ``node`` starts."""

    def node_retried(self, span: Any, event: dict[str, Any]) -> None:
        """An attempt of the node failed and it runs again (``event``: its ``node_retry``)."""

    def node_ended(self, span: Any, error: BaseException | None = None) -> None:
        """The node ended; ``error``: what it raised."""

    def fan_out_started(self, node: str, fan_in: str) -> Any:
        """The fan-out from ``node`` starts (it is planned next)."""

    def fan_out_planned(self, span: Any, total: int, isolation: str) -> TraceParent | None:
        """It has ``total`` branches on ``isolation``; the parent its branches' tasks carry
        (None: they record nothing)."""

    def branch_attempt_ended(self, span: Any, attempt: int, result: ParallelFlowResult) -> None:
        """An attempt of a branch of the fan-out ended: take the spans it sent back (or make
        its branch span from the result); ``result.spans`` is emptied."""

    def fan_out_ended(self, span: Any, results: Sequence[ParallelFlowResult] = (),
                      error: BaseException | None = None) -> None:
        """The fan-out ended with ``results`` (or raised ``error``)."""


def branch_records(parent: TraceParent, attempt: int, result: ParallelFlowResult,
                   now_ns: int | None = None) -> Sequence[SpanRecord]:
    """The records a finished attempt of a branch sent back, its branch span (the last one)
    told its ``attempt`` and worker; for a branch that sent none (its worker was killed, it
    never started) a branch span made from ``result``, ending ``now_ns``."""
    records: Sequence[SpanRecord] = result.spans
    result.spans = ()
    if records:
        branch = records[-1]
    else:
        end = now_ns if now_ns is not None else time.time_ns()
        branch = SpanRecord(SpanName.BRANCH, parent.trace_id, new_span_id(),
                            parent.span_id, end - int(result.duration_ms * 1e6), end,
                            _branch_attributes(result.branch, result.index, result.isolation))
        _fail(branch, result)
        records = (branch,)
    branch.attributes[Attr.ATTEMPT] = attempt
    if result.worker is not None:
        branch.attributes[Attr.WORKER] = str(result.worker)
    return records


def _branch_attributes(name: str, index: int | None, isolation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {Attr.BRANCH: name, Attr.ISOLATION: isolation}
    if index is not None:
        attributes[Attr.INDEX] = index
    return attributes


def _fail(span: SpanRecord, result: ParallelFlowResult) -> None:
    if not result.success:
        span.error = f"{result.error_type}: {result.error}"
        span.attributes[Attr.ERROR_TYPE] = result.error_type or "Error"
        span.attributes[Attr.TIMED_OUT] = result.timed_out


def fan_out_counts(results: Iterable[ParallelFlowResult]) -> dict[str, int]:
    """The count attributes of a fan-out span that ended with ``results``."""
    total = failed = 0
    for result in results:
        total += 1
        failed += not result.success
    return {Attr.SUCCEEDED: total - failed, Attr.FAILED: failed}


class SpanRecorder:
    """The spans of one branch, recorded as plain data where it runs (the ``Spans`` of its
    context); ``finish`` ends its branch span and returns them all, that one last."""

    def __init__(self, parent: TraceParent, *, graph: str | None, branch: str,
                 index: int | None, isolation: str) -> None:
        self._trace_id = parent.trace_id
        self._graph = graph
        self._branch = branch
        self.records: list[SpanRecord] = []
        attributes = _branch_attributes(branch, index, isolation)
        attributes[Attr.WORKER_PID] = process_id()
        attributes[Attr.WORKER_HOST] = host_name()
        if graph is not None:
            attributes[Attr.GRAPH] = graph
        # By position (end_ns 0 until it ends): keywords cost a third more, per span.
        self.root = SpanRecord(SpanName.BRANCH, parent.trace_id, new_span_id(),
                               parent.span_id, time.time_ns(), 0, attributes)

    def _child(self, name: str, attributes: dict[str, Any]) -> SpanRecord:
        attributes[Attr.BRANCH] = self._branch
        if self._graph is not None:
            attributes[Attr.GRAPH] = self._graph
        return SpanRecord(name, self._trace_id, new_span_id(), self.root.span_id,
                          time.time_ns(), 0, attributes)

    def node_started(self, node: str) -> SpanRecord:
        """A node span under the branch span."""
        return self._child(SpanName.NODE, {Attr.NODE: node, Attr.ATTEMPT: 1,
                                           Attr.CACHED: False})

    def node_retried(self, span: SpanRecord, event: dict[str, Any]) -> None:
        """Note the failed attempt as an event; the next attempt is the span's."""
        span.events = (*span.events, (RETRY_EVENT, time.time_ns(), {
            Attr.ATTEMPT: event["attempt"], Attr.ERROR_TYPE: event["error_type"]}))
        span.attributes[Attr.ATTEMPT] = event["attempt"] + 1

    def node_ended(self, span: SpanRecord, error: BaseException | None = None) -> None:
        """End a node span (failed with ``error``)."""
        span.end_ns = time.time_ns()
        if error is not None:
            span.error = error_status(error)
            span.attributes[Attr.ERROR_TYPE] = error_type(error)
        self.records.append(span)

    def fan_out_started(self, node: str, fan_in: str) -> SpanRecord:
        """A fan-out span under the branch span."""
        return self._child(SpanName.FAN_OUT, {Attr.NODE: node, Attr.FAN_IN: fan_in})

    def fan_out_planned(self, span: SpanRecord, total: int, isolation: str) -> TraceParent:
        """Note the fan-out's width and backend; its branches go under it."""
        span.attributes[Attr.TOTAL] = total
        span.attributes[Attr.ISOLATION] = isolation
        return TraceParent(span.trace_id, span.span_id)

    def branch_attempt_ended(self, span: SpanRecord, attempt: int,
                             result: ParallelFlowResult) -> None:
        """Keep the spans a branch of this branch's own fan-out sent back."""
        self.records.extend(branch_records(TraceParent(span.trace_id, span.span_id), attempt,
                                           result))

    def fan_out_ended(self, span: SpanRecord, results: Sequence[ParallelFlowResult] = (),
                      error: BaseException | None = None) -> None:
        """End a fan-out span."""
        span.attributes.update(fan_out_counts(results))
        self.node_ended(span, error)

    def finish(self, result: ParallelFlowResult) -> tuple[SpanRecord, ...]:
        """End the branch span as ``result`` says; every record, the branch span last."""
        root = self.root
        root.end_ns = time.time_ns()
        _fail(root, result)
        return (*self.records, root)
