"""Benchmark rows for the node cache and recorded nodes (docs/cache.md, docs/regression-testing.md)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from isobranch import END, START, CachePolicy, ReplayMode, SqliteCache, StateGraph, Tape
from isobranch.regression import run_agent_case

from .cases import Row, round_robin_best, speedup_row

# The node cache's targets: a hit costs at most this much more than running the
# trivial node, and at most this many times a run of it plus this margin.
HIT_EXTRA_SECONDS = 0.0002
HIT_FACTOR, HIT_MARGIN_SECONDS = 1.5, 0.0001


def _trivial(state: dict) -> dict:
    return {"y": state["x"] + 1}


def _one_node(cache: CachePolicy | None) -> StateGraph:
    graph = StateGraph()
    graph.add_node("node", _trivial, cache=cache)
    graph.add_edge(START, "node").add_edge("node", END)
    return graph


def cache_hit(batch: int = 500, repeat: int = 7) -> Row:
    """``invoke`` of a one-node graph whose trivial node is a cache hit, against the same
    graph whose node runs (no cache); batches of ``batch`` calls taking turns."""
    with tempfile.TemporaryDirectory() as directory:
        cache = SqliteCache(Path(directory) / "cache.db")
        with _one_node(None).compile(isolation="inline") as plain, \
                _one_node(CachePolicy()).compile(isolation="inline", cache=cache) as cached:
            state = {"x": 1}
            assert cached.invoke(state) == plain.invoke(state)  # stores the entry
            events = [e for e in cached.stream(state) if e["type"] == "node"]
            assert events[0].get("cached") is True, "the measured runs must be hits"

            def run(app):
                return lambda: [app.invoke(state) for _ in range(batch)]

            ran, hit = (seconds / batch for seconds in round_robin_best(
                [run(plain), run(cached)], repeat))
    limit = HIT_FACTOR * ran + HIT_MARGIN_SECONDS
    extra = hit - ran
    ok = hit <= limit and extra <= HIT_EXTRA_SECONDS
    return Row("cache hit of a trivial node (invoke), against the node running",
               "<= 1.5x run + 0.1 ms", ran, hit, hit / limit, ok,
               f"run {ran * 1000:.3f} ms, hit {hit * 1000:.3f} ms per invoke "
               f"(the hit {extra * 1000:+.3f} ms, at most +0.2 ms); ratio: hit / (1.5 x run + 0.1 ms)")


def _slow_model(seconds: float):
    def model(state: dict) -> dict:
        time.sleep(seconds)  # the "model call" a recorded node stands for
        return {"answer": f"answer to {state['question']}"}
    return model


def replayed_suite(cases: int = 200, sleep: float = 0.05) -> Row:
    """A suite of ``cases`` cases whose ``replay: true`` node takes ``sleep`` seconds live,
    recorded live and then replayed, through the regression runner (``run_agent_case``, what
    each plugin item calls) in this process, without pytest."""
    graph = StateGraph()
    graph.add_node("model", _slow_model(sleep), replay=True)
    graph.add_node("post", lambda state: {"shout": state["answer"].upper()})
    graph.add_edge(START, "model").add_edge("model", "post").add_edge("post", END)
    inputs = [{"question": f"q{n}"} for n in range(cases)]
    with graph.compile(isolation="inline") as app:
        recorded: list[Tape] = []
        started = time.perf_counter()
        for state in inputs:
            tape = Tape(ReplayMode.RECORD)
            record = run_agent_case(app, state, replay=tape)
            assert record.error is None
            recorded.append(tape)
        live = time.perf_counter() - started
        started = time.perf_counter()
        for state, tape in zip(inputs, recorded, strict=True):
            record = run_agent_case(app, state, replay=Tape(ReplayMode.REPLAY, tape.new))
            assert record.error is None and record.final["shout"] == f"ANSWER TO {state['question'].upper()}"
        replayed = time.perf_counter() - started
    return speedup_row(f"{cases}-case suite, recorded node of {sleep * 1000:g} ms, replayed",
                       10.0, live, replayed,
                       f"live {live:.2f} s, replayed {replayed * 1000:.1f} ms "
                       f"({replayed / cases * 1000:.3f} ms/case), regression runner")
