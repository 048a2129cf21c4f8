"""Benchmark rows for observing runs: small ``updates`` events, and what tracing costs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from isobranch import END, START, StateGraph
from isobranch import run as run_module

from .cases import Row, round_robin_best, slowdown_row
from .map_cases import map_graph

EVENT_BYTES = 1024


def _score(state: dict) -> dict:
    doc = state["doc"]
    return {"scores": [{"id": doc["id"], "score": doc["score"] * 2}]}


def scoring_graph():
    """A map of the documents in ``docs``; each branch appends its score through a reducer,
    so the state holds the documents and their scores after the fan-in (20,000 items at
    10,000 documents) while every branch starts from a small state."""
    graph = StateGraph({"scores": "append"})
    graph.add_node("start", lambda state: {"started": True})
    graph.add_node("score", _score)
    graph.add_fan_in_node("join", lambda state, results: {
        "failed": sum(not r.success for r in results)})
    graph.add_node("report", lambda state: {"scored": len(state["scores"])})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "score", over="docs", item_key="doc", fan_in="join")
    graph.add_edge("score", "join")
    graph.add_edge("join", "report")
    graph.add_edge("report", END)
    return graph.compile(isolation="thread", max_workers=2)


def _docs(count: int) -> list[dict]:
    return [{"id": i, "name": f"item-{i}", "score": i * 0.5, "tags": ["a", "b"], "ok": i % 2 == 0}
            for i in range(count)]


def stream_updates_event_size(items: int = 10_000, repeat: int = 3) -> Row:
    """``stream(mode="updates")`` of a map of ``items`` documents: the biggest event (at most
    1 KiB whatever the width or the state) and the run's time against ``invoke``."""
    state = {"docs": _docs(items), "scores": []}
    with scoring_graph() as app:
        final = app.invoke(state)
        assert final["scored"] == items and final["failed"] == 0, final
        assert len(final["docs"]) + len(final["scores"]) == 2 * items
        events = list(app.stream(state, mode="updates"))
        biggest = max(len(json.dumps(event)) for event in events)
        events_mode = next(e for e in app.stream(state) if e["type"] == "node"
                           and e["node"] == "report")
        invoked, streamed = round_robin_best(
            [lambda: app.invoke(state), lambda: list(app.stream(state, mode="updates"))],
            repeat)
    big = len(json.dumps(events_mode["state"]))
    row = slowdown_row(f'stream(mode="updates") of a {items:,}-item map, {2 * items // 1000}k-item '
                       f"state", 1.5, "invoke", invoked, streamed,
                       f"{len(events):,} events, the biggest {biggest} bytes (events mode: a "
                       f"node event {big / 1e6:.1f} MB); invoke {invoked:.2f} s, "
                       f"stream {streamed:.2f} s")
    row.ok = row.ok and biggest <= EVENT_BYTES
    row.target = f"events <= 1 KiB, {row.target}"
    return row


@contextmanager
def _provider(provider: object | None) -> Iterator[None]:
    """``provider`` as the global tracer provider while the block runs. The API sets its
    global provider once per process; the benchmark swaps its module attribute (private)
    so that the rows can take turns."""
    from opentelemetry import trace

    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider
    try:
        yield
    finally:
        trace._TRACER_PROVIDER = saved


@contextmanager
def _tracing_disabled() -> Iterator[None]:
    """The run as without the otel extra: no run ever asks for a tracer."""
    saved = run_module.run_tracing
    run_module.run_tracing = lambda graph, isolation: None
    try:
        yield
    finally:
        run_module.run_tracing = saved


def _timed(setting: Callable[[], AbstractContextManager], fn: Callable[[], object]
           ) -> Callable[[], None]:
    def run() -> None:
        with setting():
            fn()
    return run


def tracing_overhead(with_exporter: bool, items: int = 1_000, workers: int = 2,
                     repeat: int = 15) -> Row:
    """A map of ``items`` trivial items on the thread backend, traced (no provider, or an
    in-memory exporter behind the SDK's ``BatchSpanProcessor``, the one production setups
    use) against the same with tracing disabled (as without the extra).

    A traced run flushes its spans to the exporter before its time is taken: exporting is
    part of what tracing costs, and spans left in the processor's queue would be exported
    while a later run is timed (an untraced one, or a traced one whose queue then overflows:
    the SDK drops the spans and logs a warning for each)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    values = list(range(items))
    traced = (lambda: _provider(provider)) if with_exporter else (lambda: _provider(None))
    with map_graph("thread", workers) as app:

        def invoke() -> None:
            app.invoke({"items": values})
            exporter.clear()

        def invoke_traced() -> None:
            app.invoke({"items": values})
            if with_exporter:
                provider.force_flush()
            exporter.clear()

        invoke_traced()
        baseline, measured = round_robin_best(
            [_timed(_tracing_disabled, invoke), _timed(traced, invoke_traced)], repeat)
        with _provider(provider):
            provider.force_flush()
            exporter.clear()
            app.invoke({"items": values})
            provider.force_flush()
            spans = len(exporter.get_finished_spans())
    provider.shutdown()
    assert spans == 2 * items + 4, spans  # run, start, fan-out, join; a branch and a node each
    what = ("an in-memory exporter (batch processor)" if with_exporter
            else "the otel extra, no provider")
    return slowdown_row(f"{items:,}-item thread map traced, {what}",
                        2.0 if with_exporter else 1.05, "tracing disabled", baseline, measured,
                        f"disabled {baseline / items * 1e6:.1f} us/item, traced "
                        f"{measured / items * 1e6:.1f} us/item"
                        + (f", {spans:,} spans" if with_exporter else ""))
