"""Benchmark rows for map fan-outs on Dask, against Dask's own ``client.map`` on the same
cluster and client.

Both sides run on isobranch's local cluster (TLS, two single-threaded
workers) through one ``distributed.Client``, passed to the graph, so the
ratio is the map's cost and nothing else: ``client.map`` submits one task
per item (``pure=False``: a repeat must not find the last run's results
still held by the scheduler); isobranch sizes its tasks from measured
branch times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from isobranch import END, START, StateGraph
from isobranch.isolation.dask_cluster import start_local_cluster

from .cases import Row, slowdown_row


def trivial(item: int) -> int:
    """The work of one item: next to nothing, so the ratio is all overhead."""
    return item + 1


def twenty_ms(item: int) -> int:
    """Work of 20 ms per item (a wait, so the cores stay free for the scheduling side)."""
    time.sleep(0.02)
    return item + 1


def _map_graph(work: Callable[[int], int], client: Any):
    """start -> one branch per item of ``state["items"]`` doing ``work`` -> join."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", lambda state: {"v": work(state["item"])})
    graph.add_fan_in_node("join", lambda state, results: {
        "total": sum(r.state["v"] for r in results if r.success),
        "failed": sum(1 for r in results if not r.success)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation="dask", client=client)


def _scheduler_tasks(dask_scheduler: Any) -> int:
    return len(dask_scheduler.tasks)


def _settled(client: Any, timeout: float = 60.0) -> None:
    """Wait until the scheduler holds no task: forgetting the 10,000 tasks of a map takes
    it a second or more after their results arrived, which the next measurement would
    otherwise pay for."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_scheduler_tasks) and time.monotonic() < deadline:
        time.sleep(0.05)


def _vs_client_map(work: Callable[[int], int], items: int, at_most: float, repeat: int,
                   what: str, workers: int = 2) -> Row:
    values = list(range(items))
    expected = sum(values) + len(values)
    connection = start_local_cluster(workers, 30.0)
    client = connection.client
    try:
        with _map_graph(work, client) as app:
            def by_isobranch() -> None:
                final = app.invoke({"items": values})
                assert final["failed"] == 0 and final["total"] == expected, final

            def by_client_map() -> None:
                assert sum(client.gather(client.map(work, values, pure=False))) == expected

            def timed(run: Callable[[], None]) -> float:
                _settled(client)
                started = time.perf_counter()
                run()
                return time.perf_counter() - started

            timed(by_isobranch)
            timed(by_client_map)
            # Taking turns, so machine drift hits both alike; best of each.
            rounds = [(timed(by_client_map), timed(by_isobranch)) for _ in range(repeat)]
            baseline, measured = (min(times) for times in zip(*rounds, strict=True))
    finally:
        connection.close()
    return slowdown_row(f"map of {items:,} {what} items, dask local cluster ({workers} "
                        f"workers) vs client.map", at_most, "client.map, same client",
                        baseline, measured,
                        f"client.map {baseline / items * 1000:.3f} ms/item, "
                        f"isobranch {measured / items * 1000:.3f} ms/item")


def map_dask_vs_client_map(items: int = 10_000, repeat: int = 3) -> Row:
    """10,000 trivial items: isobranch's batched map against one Dask task per item."""
    return _vs_client_map(trivial, items, 0.2, repeat, "trivial")


def map_dask_long_vs_client_map(items: int = 1_000, repeat: int = 2) -> Row:
    """1,000 items of 20 ms: batching must not cost parallelism (no slower than client.map)."""
    return _vs_client_map(twenty_ms, items, 1.0, repeat, "20 ms")
