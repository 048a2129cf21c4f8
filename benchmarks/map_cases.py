"""Benchmark rows for map fan-outs, each measured side by side with its baseline."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from isobranch import END, START, StateGraph

from .cases import Row, comparison_row, round_robin_best, slowdown_row


def trivial(item: int) -> int:
    """The work of one item: next to nothing, so the ratio is all overhead."""
    return item + 1


def _body(state: dict) -> dict:
    return {"v": trivial(state["item"])}


def _join(state: dict, results: list) -> dict:
    return {"total": sum(r.state["v"] for r in results if r.success),
            "failed": sum(1 for r in results if not r.success)}


def map_graph(isolation: str, workers: int, **options: object):
    """start -> one branch per item of ``state["items"]`` -> join."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", _body)
    graph.add_fan_in_node("join", _join)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation=isolation, max_workers=workers, **options)


def _check(final: dict, items: list[int]) -> None:
    assert final["failed"] == 0 and final["total"] == sum(items) + len(items), final


def map_process_vs_pool(items: int = 10_000, workers: int = 2, repeat: int = 3) -> Row:
    """A map of trivial items on the process backend against ProcessPoolExecutor.map."""
    values = list(range(items))
    with map_graph("process", workers) as app, ProcessPoolExecutor(workers) as pool:
        _check(app.invoke({"items": values}), values)
        assert list(pool.map(trivial, values, chunksize=1)) == [v + 1 for v in values]
        baseline, measured = round_robin_best(
            [lambda: list(pool.map(trivial, values, chunksize=1)),
             lambda: app.invoke({"items": values})], repeat)
    return slowdown_row(f"map of {items:,} trivial items, process backend, {workers} workers",
                        1.0, "ProcessPoolExecutor.map(chunksize=1)", baseline, measured,
                        f"pool {baseline / items * 1000:.3f} ms/item, "
                        f"isobranch {measured / items * 1000:.3f} ms/item")


def map_thread_vs_pool(items: int = 10_000, workers: int = 4, repeat: int = 3) -> Row:
    """A map of trivial items on the thread backend against ThreadPoolExecutor.map."""
    values = list(range(items))
    with map_graph("thread", workers) as app, ThreadPoolExecutor(workers) as pool:
        _check(app.invoke({"items": values}), values)
        baseline, measured = round_robin_best(
            [lambda: list(pool.map(trivial, values)), lambda: app.invoke({"items": values})],
            repeat)
    return slowdown_row(f"map of {items:,} trivial items, thread backend, {workers} threads",
                        2.0, "ThreadPoolExecutor.map", baseline, measured,
                        f"pool {baseline / items * 1000:.4f} ms/item, "
                        f"isobranch {measured / items * 1000:.4f} ms/item")


def map_width_scaling(isolation: str = "thread", small: int = 1_000, large: int = 10_000,
                      repeat: int = 3) -> Row:
    """Per-item time of a map at 10,000 items against the same map at 1,000 items."""
    few, many = list(range(small)), list(range(large))
    # A state key next to the list: a design that copied the list per branch would be O(n^2).
    with map_graph(isolation, 2) as app:
        _check(app.invoke({"items": many}), many)
        small_s, large_s = round_robin_best(
            [lambda: app.invoke({"items": few}), lambda: app.invoke({"items": many})], repeat)
    per_small, per_large = small_s / small, large_s / large
    return slowdown_row(f"map per-item time at {large:,} vs {small:,} items ({isolation})",
                        1.25, f"at {small:,} items", per_small, per_large,
                        f"{per_small * 1000:.4f} ms/item at {small:,}, "
                        f"{per_large * 1000:.4f} ms/item at {large:,}")


def map_dask_vs_process(items: int = 2_000, workers: int = 2, repeat: int = 2) -> Row:
    """The same map on a local Dask cluster and on the process backend (a comparison)."""
    values = list(range(items))
    with map_graph("process", workers) as processes, map_graph("dask", workers) as dask:
        _check(processes.invoke({"items": values}), values)
        _check(dask.invoke({"items": values}), values)
        process_s, dask_s = round_robin_best(
            [lambda: processes.invoke({"items": values}), lambda: dask.invoke({"items": values})],
            repeat)
    return comparison_row(f"map of {items:,} trivial items, dask LocalCluster vs process "
                          f"({workers} workers, {os.cpu_count()} cores)", process_s, dask_s,
                          f"process {process_s / items * 1000:.3f} ms/item, "
                          f"dask {dask_s / items * 1000:.3f} ms/item")
