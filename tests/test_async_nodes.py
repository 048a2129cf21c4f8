"""Async nodes: ``async def`` nodes, fan-in nodes, routers and conditions, YAML bodies that await.

The graph-level cases on every backend are in test_async.py (its graph is
async throughout); these are the edges: timeouts, a running loop in the
calling thread, failures, YAML ``run:`` bodies.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import wait_until
from isobranch import END, START, GraphError, GraphExecutionError, StateGraph, YAMLEngine


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_an_async_node_past_branch_timeout_is_cancelled(isolation):
    ended: list[type] = []

    async def slow(state):
        try:
            await asyncio.sleep(30)
        except BaseException as exc:
            ended.append(type(exc))
            raise

    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("slow", slow)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_parallel_edge("start", "slow", fan_in="join")
    graph.add_edge(START, "start")
    graph.add_edge("join", END)
    with graph.compile(isolation=isolation, branch_timeout=0.3) as compiled:
        started = time.monotonic()
        [result] = compiled.invoke({})["results"]
        assert time.monotonic() - started < 5
    assert result.timed_out and result.error_type == "BranchTimeout"
    assert "'slow'" in result.error
    # The thread backend reports an overrun branch without waiting for it: the
    # awaited call itself must have been cancelled at its await.
    assert wait_until(lambda: ended, 10), "the async node was never cancelled"
    assert ended == [asyncio.CancelledError]


def test_sync_invoke_of_async_nodes_from_inside_a_running_loop():
    async def node(state):
        await asyncio.sleep(0)
        return {"ran": True}

    graph = StateGraph()
    graph.add_node("node", node)
    graph.add_edge(START, "node")
    graph.add_edge("node", END)
    with graph.compile(isolation="inline") as compiled:
        async def inside_a_coroutine():
            return compiled.invoke({})  # blocks this loop, as a sync call does, but works

        assert asyncio.run(inside_a_coroutine()) == {"ran": True}


def test_an_async_node_that_fails_names_the_node():
    async def broken(state):
        await asyncio.sleep(0)
        raise ValueError("no good")

    graph = StateGraph()
    graph.add_node("broken", broken)
    graph.add_edge(START, "broken")
    graph.add_edge("broken", END)
    with graph.compile(isolation="inline") as compiled, \
            pytest.raises(GraphExecutionError, match="node 'broken' failed: ValueError: no good"):
        asyncio.run(compiled.ainvoke({}))


def test_yaml_python_nodes_may_await(load):
    graph = load("""
nodes:
  - name: fetch
    run: |
      import asyncio
      await asyncio.sleep(0)
      return {"items": [1, 2, 3]}
  - name: double
    run: |
      import asyncio
      await asyncio.sleep(0)
      return {"y": state["item"] * 2}
  - name: collect
    fan_in: true
    run: |
      import asyncio
      await asyncio.sleep(0)
      return {"ys": [r.state["y"] for r in parallel_results]}
edges:
  - {from: __start__, to: fetch}
  - {from: fetch, to: double, type: map, over: items, fan_in: collect}
  - {from: double, to: collect}
  - {from: collect, to: __end__}
""")
    assert graph.invoke({})["ys"] == [2, 4, 6]
    assert asyncio.run(graph.ainvoke({}))["ys"] == [2, 4, 6]


def test_a_yaml_body_that_awaits_inside_a_plain_function_is_a_clear_error():
    document = {"nodes": [{"name": "bad", "run": "def helper():\n    await x\nreturn {}"}],
                "edges": [{"from": "__start__", "to": "bad"}, {"from": "bad", "to": "__end__"}]}
    with pytest.raises(GraphError, match=r"bad.*'await' outside async function"):
        YAMLEngine(isolation="inline").load_from_dict(document)
