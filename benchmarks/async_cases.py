"""Benchmark cases of the async API."""

from __future__ import annotations

import asyncio

from isobranch import END, START, StateGraph

from .cases import Row, round_robin_best


def _three_nodes() -> StateGraph:
    graph = StateGraph()
    graph.add_node("a", lambda state: {"a": 1})
    graph.add_node("b", lambda state: {"b": state["a"] + 1})
    graph.add_node("c", lambda state: {"c": state["b"] + 1})
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    graph.add_edge("b", "c")
    graph.add_edge("c", END)
    return graph


def ainvoke_overhead(calls: int = 200, repeat: int = 7) -> Row:
    """Per call, ``await ainvoke`` against ``invoke`` of a trivial 3-node graph, in one loop.

    Both run inside the same running event loop (``invoke`` blocking it, as
    a sync call does), taking turns, best of ``repeat`` batches of ``calls``.
    """
    with _three_nodes().compile(isolation="inline") as compiled:
        loop = asyncio.new_event_loop()
        try:
            async def sync_batch() -> None:
                for _ in range(calls):
                    compiled.invoke({})

            async def async_batch() -> None:
                for _ in range(calls):
                    await compiled.ainvoke({})

            loop.run_until_complete(async_batch())  # the run thread starts here
            baseline, measured = round_robin_best(
                [lambda: loop.run_until_complete(sync_batch()),
                 lambda: loop.run_until_complete(async_batch())], repeat)
        finally:
            loop.close()
    extra_ms = (measured - baseline) / calls * 1000
    return Row("ainvoke overhead against invoke, 3-node graph (per call)", "<= 0.5 ms more",
               baseline, measured, extra_ms / 0.5, extra_ms <= 0.5,
               f"invoke {baseline / calls * 1000:.3f} ms, ainvoke {measured / calls * 1000:.3f} "
               f"ms: {extra_ms:.3f} ms more (ratio column: extra ms / 0.5)")
