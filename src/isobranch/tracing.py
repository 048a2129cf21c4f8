"""OpenTelemetry spans of a run, in the caller, and the spans its branches sent back.

Needs the ``otel`` extra (``opentelemetry-api``), imported only when a run
starts; without it, or without a configured tracer provider (the API's
default proxy), ``run_tracing`` says no once per run and nothing else
happens: no span, no id, nothing sent to a worker.

With a provider, a run is an ``isobranch.run`` span; each main-path node an
``isobranch.node`` span and each fan-out an ``isobranch.fan_out`` span
under it; each branch an ``isobranch.branch`` span under its fan-out, with
its nodes (and its own fan-outs) under it. Contexts are passed explicitly
from span to span, never made current. A branch records its spans as plain
data wherever it runs (trace_records.py) and they come back with its
result; ``LiveSpans`` re-emits them through the tracer's span processors,
with the ids and times they were recorded with, so a span made in a
worker process or on a Dask worker reaches the caller's exporters with no
collector in the worker. Branches on the caller's own threads go the same
way, on purpose: a span made through the SDK tracer costs several times
what handing the processors a finished ``ReadableSpan`` does, and emitting
a thread branch's node spans from its own thread measured no faster.

Re-emitting a recorded span with its own ids is not something the
OpenTelemetry API offers: with the SDK's ``TracerProvider`` (the usual
one) a recorded span becomes an ``opentelemetry.sdk.trace.ReadableSpan``
(a public class, whose docstring still says users should not make them)
handed to the SDK tracer's ``span_processor`` attribute (public, but not
part of the API) with ``on_end``, as a finished span is. With another
provider the spans are started and ended again through the API with their
recorded times and parent links, under new ids.

Tracing never fails a run: the first time a call into the provider (its
tracer, a span, a span processor) raises, ``LiveSpans`` logs a warning
naming the error and traces nothing more of that run; the run goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from .branch import ParallelFlowResult
from .trace_records import (
    RETRY_EVENT,
    Attr,
    SpanName,
    SpanRecord,
    TraceParent,
    branch_records,
    error_status,
    error_type,
    fan_out_counts,
)

logger = logging.getLogger(__name__)

# The instrumentation scope of every span isobranch makes.
SCOPE_NAME = "isobranch"


@functools.cache
def _version() -> str:
    """The installed isobranch's version (read once: reading package metadata is slow)."""
    try:
        return metadata.version("isobranch")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_tracing(graph: str | None, isolation: str) -> LiveSpans | None:
    """The spans of a run that starts now (its ``isobranch.run`` span started), or None
    when nothing is to be recorded: OpenTelemetry missing, no tracer provider configured,
    the run's span not sampled, or the provider raised. Asked once per run."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    attributes: dict[str, Any] = {Attr.ISOLATION: isolation}
    if graph is not None:
        attributes[Attr.GRAPH] = graph
    try:
        tracer = provider.get_tracer(SCOPE_NAME, _version())
        run = tracer.start_span(SpanName.RUN, attributes=attributes)
        if not run.is_recording():
            run.end()
            return None
        return LiveSpans(tracer, run, graph)
    except Exception as exc:  # tracing never fails a run
        _warn(exc)
        return None


def _warn(error: Exception) -> None:
    logger.warning("tracing: the tracer provider raised %s: %s; nothing more of this run is "
                   "traced", type(error).__name__, error)


class _FanOut:
    """A fan-out's span in the caller (the handle ``fan_out_started`` returns), with the
    parent its branches' spans go under, worked out once per fan-out."""

    __slots__ = ("context", "parent", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.context = span.get_span_context()
        self.parent = TraceParent(self.context.trace_id, self.context.span_id)


class LiveSpans:
    """The spans of one run in the caller (the ``Spans`` of the main path's context).

    Every call into the provider is guarded: once one raises, ``broken`` is
    set, a warning logged, and the rest of the run is not traced (a handle
    of None, or of a fan-out started before, is then ignored).
    """

    def __init__(self, tracer: Any, run: Any, graph: str | None) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self.run = run
        self._graph = graph
        self._parent = trace.set_span_in_context(run)
        self._emit = _emitter(tracer)
        self.broken = False

    def _failed(self, error: Exception) -> None:
        if not self.broken:
            self.broken = True
            _warn(error)

    def _start(self, name: str, attributes: dict[str, Any]) -> Any:
        if self._graph is not None:
            attributes[Attr.GRAPH] = self._graph
        return self._tracer.start_span(name, context=self._parent, attributes=attributes)

    def _end(self, span: Any, error: BaseException | None) -> None:
        if self.broken:
            return
        try:
            if error is not None and not isinstance(error, GeneratorExit):
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute(Attr.ERROR_TYPE, error_type(error))
                span.set_status(Status(StatusCode.ERROR, error_status(error)))
            span.end()
        except Exception as exc:
            self._failed(exc)

    def recorded(self, run_id: str) -> None:
        """The run is recorded in a checkpointer as ``run_id``."""
        try:
            self.run.set_attribute(Attr.RUN_ID, run_id)
        except Exception as exc:
            self._failed(exc)

    def node_started(self, node: str) -> Any:
        """An ``isobranch.node`` span under the run's (None: tracing broke)."""
        if self.broken:
            return None
        try:
            return self._start(SpanName.NODE, {Attr.NODE: node, Attr.ATTEMPT: 1,
                                               Attr.CACHED: False})
        except Exception as exc:
            self._failed(exc)
            return None

    def node_retried(self, span: Any, event: dict[str, Any]) -> None:
        """An event per failed attempt; the span's attempt is the next one."""
        if span is None or self.broken:
            return
        try:
            span.add_event(RETRY_EVENT, {Attr.ATTEMPT: event["attempt"],
                                         Attr.ERROR_TYPE: event["error_type"]})
            span.set_attribute(Attr.ATTEMPT, event["attempt"] + 1)
        except Exception as exc:
            self._failed(exc)

    def node_ended(self, span: Any, error: BaseException | None = None) -> None:
        """End a node span, with an error status if the node failed."""
        if span is not None:
            self._end(span, error)

    def fan_out_started(self, node: str, fan_in: str) -> _FanOut | None:
        """An ``isobranch.fan_out`` span under the run's (None: tracing broke, and the
        fan-out's branches record nothing)."""
        if self.broken:
            return None
        try:
            return _FanOut(self._start(SpanName.FAN_OUT, {Attr.NODE: node,
                                                          Attr.FAN_IN: fan_in}))
        except Exception as exc:
            self._failed(exc)
            return None

    def fan_out_planned(self, span: _FanOut, total: int, isolation: str) -> TraceParent | None:
        """Note the width and backend; the parent the branches' tasks carry."""
        if self.broken:
            return None
        try:
            span.span.set_attributes({Attr.TOTAL: total, Attr.ISOLATION: isolation})
        except Exception as exc:
            self._failed(exc)
            return None
        return span.parent

    def branch_attempt_ended(self, span: _FanOut, attempt: int, result: ParallelFlowResult
                             ) -> None:
        """Emit the spans a branch's attempt sent back (in the driver's thread)."""
        records = branch_records(span.parent, attempt, result)
        if self.broken:
            return
        try:
            self._emit(span.context, records)
        except Exception as exc:
            self._failed(exc)

    def fan_out_ended(self, span: _FanOut, results: Sequence[ParallelFlowResult] = (),
                      error: BaseException | None = None) -> None:
        """End a fan-out span with its counts."""
        if results and not self.broken:
            try:
                span.span.set_attributes(fan_out_counts(results))
            except Exception as exc:
                self._failed(exc)
        self._end(span.span, error)

    def run_ended(self, error: BaseException | None) -> None:
        """End the run's span (``error``: what ended the run; a stream closed early is not
        a failure)."""
        self._end(self.run, error)


def _emitter(tracer: Any) -> Any:
    """What hands a branch's recorded spans to ``tracer``'s provider: ``emit(parent, records)``,
    ``parent`` the ``SpanContext`` of the fan-out span they go under."""
    try:
        from opentelemetry.sdk.trace import Tracer as SdkTracer
    except ImportError:
        return _ThroughApi(tracer)
    return _ToSdkProcessors(tracer) if isinstance(tracer, SdkTracer) else _ThroughApi(tracer)


class _ToSdkProcessors:
    """Recorded spans as the SDK's ``ReadableSpan``s, with their own ids and times, handed to
    the SDK tracer's span processors as finished spans are (see the module's docstring)."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        self._on_end = tracer.span_processor.on_end
        self._event = Event
        self._readable = ReadableSpan
        self._span_context = SpanContext
        self._kind = SpanKind.INTERNAL
        self._status = Status
        self._error = StatusCode.ERROR
        self._unset = Status(StatusCode.UNSET)
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._scope = InstrumentationScope(SCOPE_NAME, _version())
        self._resource = tracer.resource
        self._positional = _readable_takes_positions()

    def __call__(self, parent: Any, records: Sequence[SpanRecord]) -> None:
        # A span's children are recorded before it ends: its context is made for the first
        # child and found again when its own turn comes.
        contexts = {parent.span_id: parent}
        span_context, flags, readable, on_end = (self._span_context, self._flags,
                                                 self._readable, self._on_end)
        resource, kind, scope, unset = self._resource, self._kind, self._scope, self._unset
        positional = self._positional
        for record in records:
            trace_id = record.trace_id
            own = contexts.get(record.span_id)
            if own is None:
                own = span_context(trace_id, record.span_id, False, flags)
            up = contexts.get(record.parent_id)
            if up is None:
                up = contexts[record.parent_id] = span_context(trace_id, record.parent_id,
                                                               False, flags)
            events = record.events
            if events:
                events = [self._event(name, attributes, at) for name, at, attributes in events]
            status = unset if record.error is None else self._status(self._error, record.error)
            if positional:
                span = readable(record.name, own, up, resource, record.attributes, events, (),
                                kind, None, status, record.start_ns, record.end_ns, scope)
            else:
                span = readable(record.name, context=own, parent=up, resource=resource,
                                attributes=record.attributes, events=events, kind=kind,
                                status=status, start_time=record.start_ns,
                                end_time=record.end_ns, instrumentation_scope=scope)
            on_end(span)


# ``ReadableSpan``'s parameters in order, as the SDK has had them since 1.20: passed by
# position, a span is made in half the time keywords take (two are made per branch).
_READABLE_PARAMETERS = ("name", "context", "parent", "resource", "attributes", "events", "links",
                        "kind", "instrumentation_info", "status", "start_time", "end_time",
                        "instrumentation_scope")


@functools.cache
def _readable_takes_positions() -> bool:
    """Whether the installed SDK's ``ReadableSpan`` takes ``_READABLE_PARAMETERS`` in that
    order (asked once per process; otherwise spans are made with keywords)."""
    import inspect

    from opentelemetry.sdk.trace import ReadableSpan

    parameters = tuple(inspect.signature(ReadableSpan.__init__).parameters)
    return parameters[1:len(_READABLE_PARAMETERS) + 1] == _READABLE_PARAMETERS


class _ThroughApi:
    """Recorded spans started and ended again through the API, for a provider that is not
    the SDK's: new ids, the recorded times, attributes, events and status; a branch span's
    parent is its fan-out span, each other span's its re-started parent."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        self._tracer = tracer
        self._span_context = SpanContext
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._in_context = trace.set_span_in_context
        self._non_recording = NonRecordingSpan
        self._status = Status
        self._error = StatusCode.ERROR

    def __call__(self, parent: Any, records: Sequence[SpanRecord]) -> None:
        spans: dict[int, Any] = {parent.span_id: self._non_recording(parent)}
        for record in sorted(records, key=lambda r: r.start_ns):  # parents start first
            up = spans.get(record.parent_id)
            if up is None:  # not expected: a parent that was not sent along
                up = self._non_recording(self._span_context(record.trace_id, record.parent_id,
                                                            False, self._flags))
            span = self._tracer.start_span(record.name, self._in_context(up),
                                           attributes=record.attributes,
                                           start_time=record.start_ns)
            for name, at, attributes in record.events:
                span.add_event(name, attributes, at)
            if record.error is not None:
                span.set_status(self._status(self._error, record.error))
            spans[record.span_id] = span
        for record in records:  # children end first, as recorded
            spans[record.span_id].end(record.end_ns)
