"""Benchmark rows for reducers: map branches building one list through the state schema."""

from __future__ import annotations

from isobranch import END, START, StateGraph

from .cases import Row, round_robin_best


def _append_one(state: dict) -> dict:
    return {"results": [state["item"] + 1]}


def _collect(state: dict, results: list) -> dict:
    return {"results": [r.state["results"][-1] for r in results if r.success]}


def reducer_map(isolation: str, *, by_reducer: bool, workers: int = 2):
    """start -> one branch per item, each writing ``results: [item + 1]`` -> join.

    ``by_reducer``: an ``append`` reducer combines the writes (no fan-in
    code); otherwise the fan-in node builds the list from the results.
    """
    graph = StateGraph({"results": "append"} if by_reducer else None)
    graph.add_node("start", lambda state: None)
    graph.add_node("body", _append_one)
    graph.add_fan_in_node("join", (lambda state, results: None) if by_reducer else _collect)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation=isolation, max_workers=workers)


def _check(final: dict, items: list[int]) -> None:
    assert final["results"] == [item + 1 for item in items], "the list is not in item order"


def reducer_vs_fan_in_code(isolation: str = "thread", items: int = 10_000,
                           repeat: int = 3) -> Row:
    """A 10,000-item map whose list is built by an append reducer, against fan-in code."""
    values = list(range(items))
    with reducer_map(isolation, by_reducer=False) as code, \
            reducer_map(isolation, by_reducer=True) as reducer:
        _check(code.invoke({"items": values}), values)
        _check(reducer.invoke({"items": values}), values)
        baseline, measured = round_robin_best(
            [lambda: code.invoke({"items": values}), lambda: reducer.invoke({"items": values})],
            repeat)
    ratio = measured / baseline
    return Row(f"map of {items:,} items appending through a reducer vs fan-in code ({isolation})",
               "<= 1.25x fan-in code", baseline, measured, ratio, ratio <= 1.25,
               f"fan-in code {baseline / items * 1000:.4f} ms/item, "
               f"reducer {measured / items * 1000:.4f} ms/item")


def reducer_width_scaling(isolation: str = "thread", small: int = 1_000, large: int = 10_000,
                          repeat: int = 3) -> Row:
    """Per-item time of the reducer map at 10,000 items against 1,000: combining is O(n)."""
    few, many = list(range(small)), list(range(large))
    with reducer_map(isolation, by_reducer=True) as app:
        _check(app.invoke({"items": many}), many)
        small_s, large_s = round_robin_best(
            [lambda: app.invoke({"items": few}), lambda: app.invoke({"items": many})], repeat)
    per_small, per_large = small_s / small, large_s / large
    ratio = per_large / per_small
    return Row(f"reducer map per-item time at {large:,} vs {small:,} items ({isolation})",
               "<= 1.25x", per_small, per_large, ratio, ratio <= 1.25,
               f"{per_small * 1000:.4f} ms/item at {small:,}, "
               f"{per_large * 1000:.4f} ms/item at {large:,}")
