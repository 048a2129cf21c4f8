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
collector in the worker.

Re-emitting a recorded span with its own ids is not something the
OpenTelemetry API offers: with the SDK's ``TracerProvider`` (the usual
one) a recorded span becomes an ``opentelemetry.sdk.trace.ReadableSpan``
(a public class, whose docstring still says users should not make them)
handed to the SDK tracer's ``span_processor`` attribute (public, but not
part of the API) with ``on_end``, as a finished span is. With another
provider the spans are started and ended again through the API with their
recorded times and parent links, under new ids.
"""

from __future__ import annotations

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


def _version() -> str:
    try:
        return metadata.version("isobranch")
    except metadata.PackageNotFoundError:
        return "unknown"


def run_tracing(graph: str | None, isolation: str) -> LiveSpans | None:
    """The spans of a run that starts now (its ``isobranch.run`` span started), or None
    when nothing is to be recorded: OpenTelemetry missing, no tracer provider configured,
    or the run's span not sampled. Asked once per run."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    tracer = provider.get_tracer(SCOPE_NAME, _version())
    attributes: dict[str, Any] = {Attr.ISOLATION: isolation}
    if graph is not None:
        attributes[Attr.GRAPH] = graph
    run = tracer.start_span(SpanName.RUN, attributes=attributes)
    if not run.is_recording():
        run.end()
        return None
    return LiveSpans(tracer, run, graph)


class LiveSpans:
    """The spans of one run in the caller (the ``Spans`` of the main path's context)."""

    def __init__(self, tracer: Any, run: Any, graph: str | None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self._tracer = tracer
        self.run = run
        self._graph = graph
        self._parent = trace.set_span_in_context(run)
        self._emit = _Emitter(tracer)

    def _start(self, name: str, attributes: dict[str, Any]) -> Any:
        if self._graph is not None:
            attributes[Attr.GRAPH] = self._graph
        return self._tracer.start_span(name, context=self._parent, attributes=attributes)

    def _end(self, span: Any, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, GeneratorExit):
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute(Attr.ERROR_TYPE, error_type(error))
            span.set_status(Status(StatusCode.ERROR, error_status(error)))
        span.end()

    def recorded(self, run_id: str) -> None:
        """The run is recorded in a checkpointer as ``run_id``."""
        self.run.set_attribute(Attr.RUN_ID, run_id)

    def node_started(self, node: str) -> Any:
        """An ``isobranch.node`` span under the run's."""
        return self._start(SpanName.NODE, {Attr.NODE: node, Attr.ATTEMPT: 1,
                                           Attr.CACHED: False})

    def node_retried(self, span: Any, event: dict[str, Any]) -> None:
        """An event per failed attempt; the span's attempt is the next one."""
        span.add_event(RETRY_EVENT, {Attr.ATTEMPT: event["attempt"],
                                     Attr.ERROR_TYPE: event["error_type"]})
        span.set_attribute(Attr.ATTEMPT, event["attempt"] + 1)

    def node_ended(self, span: Any, error: BaseException | None = None) -> None:
        """End a node span, with an error status if the node failed."""
        self._end(span, error)

    def fan_out_started(self, node: str, fan_in: str) -> Any:
        """An ``isobranch.fan_out`` span under the run's."""
        return self._start(SpanName.FAN_OUT, {Attr.NODE: node, Attr.FAN_IN: fan_in})

    def fan_out_planned(self, span: Any, total: int, isolation: str) -> TraceParent:
        """Note the width and backend; the parent the branches' tasks carry."""
        span.set_attribute(Attr.TOTAL, total)
        span.set_attribute(Attr.ISOLATION, isolation)
        context = span.get_span_context()
        return TraceParent(context.trace_id, context.span_id)

    def branch_attempt_ended(self, span: Any, attempt: int, result: ParallelFlowResult) -> None:
        """Emit the spans a branch's attempt sent back (in the driver's thread)."""
        context = span.get_span_context()
        self._emit(branch_records(TraceParent(context.trace_id, context.span_id), attempt,
                                  result))

    def fan_out_ended(self, span: Any, results: Sequence[ParallelFlowResult] = (),
                      error: BaseException | None = None) -> None:
        """End a fan-out span with its counts."""
        if results:
            span.set_attributes(fan_out_counts(results))
        self._end(span, error)

    def run_ended(self, error: BaseException | None) -> None:
        """End the run's span (``error``: what ended the run; a stream closed early is not
        a failure)."""
        self._end(self.run, error)


class _Emitter:
    """Hands recorded spans to a tracer's processors (see the module's docstring)."""

    def __init__(self, tracer: Any) -> None:
        self._processor = getattr(tracer, "span_processor", None)
        self._tracer = tracer
        if self._processor is not None:
            from opentelemetry.sdk.trace import Event, ReadableSpan
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
            from opentelemetry.trace.status import Status, StatusCode

            self._sdk = (Event, ReadableSpan, SpanContext, SpanKind, Status, StatusCode)
            self._flags = TraceFlags(TraceFlags.SAMPLED)
            self._scope = InstrumentationScope(SCOPE_NAME, _version())
            self._resource = tracer.resource
            self._unset = Status(StatusCode.UNSET)

    def __call__(self, records: Sequence[SpanRecord]) -> None:
        if self._processor is not None:
            contexts: dict[int, Any] = {}  # a branch's nodes share their parent's context
            for record in records:
                self._processor.on_end(self._readable(record, contexts))
        else:
            self._through_api(records)

    def _context(self, trace_id: int, span_id: int, contexts: dict[int, Any]) -> Any:
        context = contexts.get(span_id)
        if context is None:
            context = contexts[span_id] = self._sdk[2](trace_id, span_id, False, self._flags)
        return context

    def _readable(self, record: SpanRecord, contexts: dict[int, Any]) -> Any:
        event_class, readable, _, kind, status, code = self._sdk
        return readable(
            record.name,
            context=self._context(record.trace_id, record.span_id, contexts),
            parent=self._context(record.trace_id, record.parent_id, contexts),
            resource=self._resource, attributes=record.attributes,
            events=[event_class(name, attributes, at) for name, at, attributes in record.events]
            if record.events else (),
            kind=kind.INTERNAL,
            status=self._unset if record.error is None else status(code.ERROR, record.error),
            start_time=record.start_ns, end_time=record.end_ns,
            instrumentation_scope=self._scope)

    def _through_api(self, records: Sequence[SpanRecord]) -> None:
        """Start and end each span again through the API: new ids, the recorded parents."""
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        spans: dict[int, Any] = {}
        for record in sorted(records, key=lambda r: r.start_ns):  # parents start first
            parent = spans.get(record.parent_id)
            if parent is None:
                parent = NonRecordingSpan(SpanContext(record.trace_id, record.parent_id, False,
                                                      TraceFlags(TraceFlags.SAMPLED)))
            span = self._tracer.start_span(record.name, trace.set_span_in_context(parent),
                                           attributes=record.attributes,
                                           start_time=record.start_ns)
            for name, at, attributes in record.events:
                span.add_event(name, attributes, at)
            if record.error is not None:
                span.set_status(Status(StatusCode.ERROR, record.error))
            spans[record.span_id] = span
        for record in records:  # children end first, as recorded
            spans[record.span_id].end(record.end_ns)
