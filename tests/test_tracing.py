"""OpenTelemetry traces of runs, checked with the SDK's in-memory exporter on every backend.

Branch spans are children of their fan-out span, a branch's node spans
children of its branch span, one trace id throughout, wherever the branch
ran (a worker process, a Dask worker: sent back with the result). Nothing
is recorded, and no trace context crosses to a branch, without a provider.
"""

from __future__ import annotations

import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from conftest import HAVE_DASK
from isobranch import END, START, StateGraph
from isobranch.errors import GraphExecutionError

ATTR = "isobranch."


@pytest.fixture
def exporter(monkeypatch):
    """A tracer provider exporting to memory, set as the global one for this test only.

    The API sets its global provider once per process; the test puts it back
    (the module attribute ``set_tracer_provider`` fills) so other tests see none.
    """
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield memory
    provider.shutdown()


def _body(state: dict) -> dict:
    if state["item"] == 2:
        raise ValueError("item 2 is bad")
    return {"v": state["item"] * 10}


def map_graph(isolation: str, **options):
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", _body)
    graph.add_fan_in_node("join", lambda state, results: {
        "total": sum(r.state["v"] for r in results if r.success)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation=isolation, max_workers=2, name="traced", **options)


def by_name(spans, name: str) -> list:
    return [span for span in spans if span.name == name]


def check_map_trace(spans, isolation: str, items: list[int]) -> None:
    """The spans of one run of ``map_graph`` over ``items`` (item 2 fails)."""
    (run,) = by_name(spans, "isobranch.run")
    (fan_out,) = by_name(spans, "isobranch.fan_out")
    branches = by_name(spans, "isobranch.branch")
    nodes = by_name(spans, "isobranch.node")
    assert len(spans) == 1 + 1 + len(items) + 2 + len(items)
    assert {span.context.trace_id for span in spans} == {run.context.trace_id}
    assert run.parent is None
    assert run.attributes[ATTR + "graph"] == "traced"
    assert run.attributes[ATTR + "isolation"] == isolation
    assert fan_out.parent.span_id == run.context.span_id
    assert fan_out.attributes[ATTR + "branches.total"] == len(items)
    assert fan_out.attributes[ATTR + "branches.failed"] == items.count(2)
    main_nodes = [n for n in nodes if n.parent.span_id == run.context.span_id]
    assert sorted(n.attributes[ATTR + "node"] for n in main_nodes) == ["join", "start"]
    branch_ids = {b.context.span_id: b for b in branches}
    assert {b.parent.span_id for b in branches} == {fan_out.context.span_id}
    assert sorted(b.attributes[ATTR + "index"] for b in branches) == list(range(len(items)))
    for branch in branches:
        index = branch.attributes[ATTR + "index"]
        assert branch.attributes[ATTR + "branch"] == f"body[{index}]"
        assert branch.attributes[ATTR + "isolation"] == isolation
        assert branch.attributes[ATTR + "attempt"] == 1
        assert branch.attributes[ATTR + "worker"]
        assert isinstance(branch.attributes[ATTR + "worker.pid"], int)
        failed = items[index] == 2
        assert (branch.status.status_code is StatusCode.ERROR) == failed
        if failed:
            assert branch.attributes[ATTR + "error_type"] == "ValueError"
            assert "item 2 is bad" in branch.status.description
    branch_nodes = [n for n in nodes if n.parent.span_id in branch_ids]
    assert len(branch_nodes) == len(items)
    for node in branch_nodes:
        branch = branch_ids[node.parent.span_id]
        assert node.attributes[ATTR + "branch"] == branch.attributes[ATTR + "branch"]
        assert node.attributes[ATTR + "node"] == "body"
        assert node.attributes[ATTR + "cached"] is False
        assert node.start_time >= branch.start_time and node.end_time <= branch.end_time
        assert (node.status.status_code is StatusCode.ERROR) == (
            branch.status.status_code is StatusCode.ERROR)
    if isolation == "process":  # made in worker processes, not here
        import os

        assert {b.attributes[ATTR + "worker.pid"] for b in branches} - {os.getpid()}
        assert os.getpid() not in {b.attributes[ATTR + "worker.pid"] for b in branches}


@pytest.mark.parametrize("isolation", ["inline", "thread", "process"])
def test_spans_of_a_map_are_linked_on_every_backend(exporter, isolation):
    with map_graph(isolation) as app:
        assert app.invoke({"items": [1, 2, 3, 4]}) == {"items": [1, 2, 3, 4], "total": 80}
    check_map_trace(exporter.get_finished_spans(), isolation, [1, 2, 3, 4])


def test_spans_are_made_with_keywords_when_the_sdk_orders_them_otherwise(exporter,
                                                                        monkeypatch):
    """Branch spans are made by position only when the SDK's ``ReadableSpan`` takes its
    parameters in the order isobranch knows; otherwise by keyword, with the same spans."""
    from isobranch import tracing

    monkeypatch.setattr(tracing, "_readable_takes_positions", lambda: False)
    with map_graph("process") as app:
        app.invoke({"items": [1, 2, 3, 4]})
    check_map_trace(exporter.get_finished_spans(), "process", [1, 2, 3, 4])


@pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed")
def test_spans_made_on_dask_workers_reach_the_callers_exporter(exporter):
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address="127.0.0.1:0",
                      silence_logs=logging.CRITICAL) as cluster, \
            map_graph("dask", backend_options={"dask_address": cluster.scheduler_address}) \
            as app:
        app.invoke({"items": [1, 2, 3]})
        workers = set(cluster.scheduler_info["workers"])
    spans = exporter.get_finished_spans()
    check_map_trace(spans, "dask", [1, 2, 3])
    assert {b.attributes[ATTR + "worker"] for b in by_name(spans, "isobranch.branch")} <= workers


def test_a_failing_main_path_node_gives_its_span_and_the_runs_an_error_status(exporter):
    graph = StateGraph()
    graph.add_node("boom", lambda state: 1 / 0)
    graph.add_edge(START, "boom")
    graph.add_edge("boom", END)
    with graph.compile(isolation="inline") as app, pytest.raises(GraphExecutionError):
        app.invoke({})
    spans = exporter.get_finished_spans()
    (node,) = by_name(spans, "isobranch.node")
    (run,) = by_name(spans, "isobranch.run")
    for span in (node, run):
        assert span.status.status_code is StatusCode.ERROR
        assert "ZeroDivisionError" in span.status.description
    assert node.attributes[ATTR + "error_type"] == "ZeroDivisionError"


def test_nested_fan_outs_in_a_worker_process_nest_their_spans(exporter):
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("outer", lambda state: {"seen": state["item"]})
    graph.add_node("a", lambda state: {"a": 1})
    graph.add_node("b", lambda state: {"b": 2})
    graph.add_fan_in_node("inner_join", lambda state, results: None)
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "outer", over="items", fan_in="join")
    graph.add_parallel_edge("outer", "a", fan_in="inner_join")
    graph.add_parallel_edge("outer", "b", fan_in="inner_join")
    graph.add_edge("a", "inner_join")
    graph.add_edge("b", "inner_join")
    graph.add_edge("inner_join", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="process", max_workers=2) as app:
        app.invoke({"items": [7]})
    spans = exporter.get_finished_spans()
    ids = {span.context.span_id: span for span in spans}
    inner = next(s for s in spans if s.attributes.get(ATTR + "branch") == "outer[0]/a"
                 and s.name == "isobranch.branch")
    inner_fan_out = ids[inner.parent.span_id]
    outer = ids[inner_fan_out.parent.span_id]
    assert (inner_fan_out.name, outer.name) == ("isobranch.fan_out", "isobranch.branch")
    assert outer.attributes[ATTR + "branch"] == "outer[0]"
    assert ids[outer.parent.span_id].name == "isobranch.fan_out"
    assert ids[ids[outer.parent.span_id].parent.span_id].name == "isobranch.run"
    assert len({span.context.trace_id for span in spans}) == 1


def fails_once(marker):
    """A node body that raises ConnectionError on its first run (``marker`` absent), then
    returns ``{"ok": True}``."""
    def flaky(state: dict) -> dict:
        if not marker.exists():
            marker.touch()
            raise ConnectionError("flaky")
        return {"ok": True}
    return flaky


def one_branch_graph(name: str, body, *, node_retry=None, edge_retry=None) -> StateGraph:
    """start -> one parallel branch, node ``name`` running ``body`` -> join; ``node_retry``
    goes on the node, ``edge_retry`` on the parallel edge."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node(name, body, **({"retry": node_retry} if node_retry else {}))
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", name, fan_in="join",
                            **({"retry": edge_retry} if edge_retry else {}))
    graph.add_edge(name, "join")
    graph.add_edge("join", END)
    return graph


def test_each_attempt_of_a_retried_branch_is_its_own_span(exporter, tmp_path):
    graph = one_branch_graph("flaky", fails_once(tmp_path / "failed-once"),
                             edge_retry={"max_attempts": 2, "initial_interval": 0.001,
                                         "retry_on": ("ConnectionError",)})
    with graph.compile(isolation="thread") as app:
        app.invoke({})
    branches = sorted(by_name(exporter.get_finished_spans(), "isobranch.branch"),
                      key=lambda span: span.attributes[ATTR + "attempt"])
    assert [b.attributes[ATTR + "attempt"] for b in branches] == [1, 2]
    assert [b.status.status_code for b in branches] == [StatusCode.ERROR, StatusCode.UNSET]


def test_a_branch_killed_in_its_worker_still_gets_a_span_made_by_the_caller(exporter):
    import os

    graph = one_branch_graph("dies", lambda state: os._exit(3))
    with graph.compile(isolation="process") as app:
        app.invoke({})
    (branch,) = by_name(exporter.get_finished_spans(), "isobranch.branch")
    (fan_out,) = by_name(exporter.get_finished_spans(), "isobranch.fan_out")
    assert branch.parent.span_id == fan_out.context.span_id
    assert branch.status.status_code is StatusCode.ERROR
    assert branch.end_time >= branch.start_time


@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_without_a_provider_nothing_is_recorded_and_no_trace_crosses(isolation, monkeypatch):
    from isobranch import runner, tracing

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    assert tracing.run_tracing("g", isolation) is None
    crossed = []
    monkeypatch.setattr(runner, "_traced", lambda tasks, parent: crossed.append(parent))
    with map_graph(isolation) as app:
        events = list(app.stream({"items": [1, 3]}))
    (parallel,) = [e for e in events if e["type"] == "parallel"]
    assert [r.success for r in parallel["branches"]] == [True, True]
    assert all(result.spans == () for result in parallel["branches"])
    assert crossed == []


def test_results_handed_on_carry_no_spans(exporter):
    with map_graph("inline") as app:
        events = list(app.stream({"items": [1, 3]}))
    (parallel,) = [e for e in events if e["type"] == "parallel"]
    assert all(result.spans == () for result in parallel["branches"])
    assert len(by_name(exporter.get_finished_spans(), "isobranch.branch")) == 2


class RecordedSpan(trace.Span):
    """A span of ``RecordingProvider``: it keeps what the API told it."""

    def __init__(self, name: str, context: trace.SpanContext, parent: trace.SpanContext | None,
                 attributes, start_time: int | None) -> None:
        self.name, self.context, self.parent = name, context, parent
        self.attributes = dict(attributes or {})
        self.start_time, self.end_time = start_time, None
        self.events: list[tuple] = []
        self.status = trace.Status(StatusCode.UNSET)
        self.ends = 0

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def set_attributes(self, attributes) -> None:
        self.attributes.update(attributes)

    def set_attribute(self, key: str, value) -> None:
        self.attributes[key] = value

    def add_event(self, name: str, attributes=None, timestamp=None) -> None:
        self.events.append((name, dict(attributes or {}), timestamp))

    def update_name(self, name: str) -> None:
        self.name = name

    def is_recording(self) -> bool:
        return self.ends == 0

    def set_status(self, status, description=None) -> None:
        self.status = status

    def record_exception(self, exception, attributes=None, timestamp=None, escaped=False) -> None:
        raise AssertionError("isobranch records no exceptions on spans")

    def end(self, end_time: int | None = None) -> None:
        self.ends += 1
        self.end_time = end_time


class RecordingProvider(trace.TracerProvider, trace.Tracer):
    """A tracer provider that is not the SDK's: its own ids (counting up), every span kept.

    ``fail_on`` names a span that makes ``start_span`` raise (a provider that breaks).
    """

    def __init__(self, fail_on: str | None = None) -> None:
        self.spans: list[RecordedSpan] = []
        self.fail_on = fail_on

    def get_tracer(self, instrumenting_module_name, instrumenting_library_version=None,
                   schema_url=None, attributes=None) -> trace.Tracer:
        return self

    def start_span(self, name, context=None, kind=trace.SpanKind.INTERNAL, attributes=None,
                   links=None, start_time=None, record_exception=True,
                   set_status_on_exception=True) -> RecordedSpan:
        if name == self.fail_on:
            raise RuntimeError(f"this provider cannot start {name}")
        parent = trace.get_current_span(context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else 1000 + len(self.spans)
        own = trace.SpanContext(trace_id, len(self.spans) + 1, False,
                                trace.TraceFlags(trace.TraceFlags.SAMPLED))
        span = RecordedSpan(name, own, parent if parent.is_valid else None, attributes,
                            start_time)
        self.spans.append(span)
        return span

    def start_as_current_span(self, *args, **kwargs):
        raise AssertionError("isobranch never makes a span current")


def test_worker_spans_reach_a_provider_that_is_not_the_sdks_through_the_api(monkeypatch):
    """The fallback: spans recorded in worker processes are started and ended again through
    the API, under the provider's own ids, with their parents, times and status."""
    provider = RecordingProvider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    items = [1, 2, 3, 4]
    with map_graph("process") as app:
        assert app.invoke({"items": items}) == {"items": items, "total": 80}
    spans = provider.spans
    assert all(span.ends == 1 for span in spans)
    (run,) = by_name(spans, "isobranch.run")
    (fan_out,) = by_name(spans, "isobranch.fan_out")
    branches = by_name(spans, "isobranch.branch")
    nodes = by_name(spans, "isobranch.node")
    assert len(spans) == 1 + 1 + len(items) + 2 + len(items)
    assert {span.context.trace_id for span in spans} == {run.context.trace_id}
    assert fan_out.parent.span_id == run.context.span_id
    assert {b.parent.span_id for b in branches} == {fan_out.context.span_id}
    by_id = {b.context.span_id: b for b in branches}
    branch_nodes = [n for n in nodes if n.parent.span_id in by_id]
    assert len(branch_nodes) == len(items)
    for node in branch_nodes:
        branch = by_id[node.parent.span_id]
        assert node.attributes[ATTR + "branch"] == branch.attributes[ATTR + "branch"]
        assert node.attributes[ATTR + "node"] == "body"
        # The times they were recorded with, in the worker: the node within its branch.
        assert branch.start_time <= node.start_time <= node.end_time <= branch.end_time
    import os

    for branch in branches:
        index = branch.attributes[ATTR + "index"]
        assert branch.attributes[ATTR + "branch"] == f"body[{index}]"
        assert branch.attributes[ATTR + "isolation"] == "process"
        assert branch.attributes[ATTR + "attempt"] == 1
        assert branch.attributes[ATTR + "worker.pid"] != os.getpid()
        node = next(n for n in branch_nodes if n.parent.span_id == branch.context.span_id)
        failed = items[index] == 2
        for span in (branch, node):
            assert (span.status.status_code is StatusCode.ERROR) == failed
            if failed:
                assert span.attributes[ATTR + "error_type"] == "ValueError"
                assert "item 2 is bad" in span.status.description
    assert sorted(b.attributes[ATTR + "index"] for b in branches) == list(range(len(items)))


def test_a_node_retry_in_a_worker_is_an_event_through_the_api_fallback(monkeypatch, tmp_path):
    provider = RecordingProvider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    graph = one_branch_graph("flaky", fails_once(tmp_path / "failed-once"),
                             node_retry={"max_attempts": 2, "initial_interval": 0.001,
                                         "retry_on": ("ConnectionError",)})
    with graph.compile(isolation="process") as app:
        app.invoke({})
    (node,) = [n for n in by_name(provider.spans, "isobranch.node")
               if n.attributes[ATTR + "node"] == "flaky"]
    ((name, attributes, at),) = node.events
    assert name == "isobranch.retry"
    assert attributes == {ATTR + "attempt": 1, ATTR + "error_type": "ConnectionError"}
    assert node.start_time <= at <= node.end_time
    assert node.attributes[ATTR + "attempt"] == 2
    assert node.status.status_code is StatusCode.UNSET


class RaisingProcessor(SimpleSpanProcessor):
    """A span processor whose ``on_end`` raises for the branch spans (an exporter setup that
    broke): they are the spans the caller hands on for a branch, wherever it ran."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        super().__init__(self.exporter)

    def on_end(self, span) -> None:
        if span.name == "isobranch.branch":
            raise RuntimeError("the collector is gone")
        super().on_end(span)


class RaisingSdkProvider(TracerProvider):
    """The SDK's provider with a ``RaisingProcessor``."""

    def __init__(self) -> None:
        super().__init__()
        self.processor = RaisingProcessor()
        self.add_span_processor(self.processor)


@pytest.mark.parametrize(("isolation", "provider", "raised"), [
    ("inline", lambda: RecordingProvider(fail_on="isobranch.run"), "cannot start isobranch.run"),
    ("process", lambda: RecordingProvider(fail_on="isobranch.fan_out"),
     "cannot start isobranch.fan_out"),
    ("thread", RaisingSdkProvider, "the collector is gone"),
    ("process", RaisingSdkProvider, "the collector is gone"),
], ids=["start-run", "start-fan-out", "on-end-thread", "on-end-process"])
def test_a_provider_that_raises_never_fails_the_run(monkeypatch, caplog, isolation, provider,
                                                    raised):
    """Tracing never fails a run: the first error from the provider is logged once as a
    warning, and the rest of the run is not traced (nothing more reaches the provider)."""
    provider = provider()
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    with caplog.at_level(logging.WARNING, logger="isobranch.tracing"), \
            map_graph(isolation) as app:
        for _ in range(2):  # each run says so once
            assert app.invoke({"items": [1, 2, 3, 4]}) == {"items": [1, 2, 3, 4], "total": 80}
    warnings = [r.getMessage() for r in caplog.records if r.name == "isobranch.tracing"]
    assert len(warnings) == 2, warnings
    assert all(raised in message and "nothing more of this run is traced" in message
               for message in warnings)
    if isinstance(provider, RecordingProvider):
        started = [span.name for span in provider.spans]
        # Nothing is started after the failure: only the spans before it, per run.
        assert started == ([] if provider.fail_on == "isobranch.run"
                           else ["isobranch.run", "isobranch.node"] * 2)
    else:  # the main path's first node ended before the first branch span failed
        exported = provider.processor.exporter.get_finished_spans()
        assert [s.attributes.get(ATTR + "node") for s in exported
                if s.name == "isobranch.node" and ATTR + "branch" not in s.attributes] == [
            "start", "start"]
