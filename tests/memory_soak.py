"""Telling a memory leak from a warm-up in soak tests.

A long run's memory often grows at first and then levels off: pools and
allocator arenas fill, caches warm up, and libraries keep bounded histories
(Dask's scheduler keeps its last computations for its dashboard). A leak is
growth that keeps going. So growth is measured between two windows that both
come after a warm-up: the median resident size over the second window minus
the median over the first. A plateau reached during the warm-up or the first
window shows as no growth; a leak shows as the growth of one window's worth
of rounds.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

from benchmarks.proc_scan import rss_bytes


def late_growth(run_round: Callable[[], object], *, warmup_rounds: int,
                window_rounds: int) -> int:
    """Bytes the RSS grew between two windows of ``window_rounds`` after ``warmup_rounds``.

    ``run_round`` is called ``warmup_rounds + 2 * window_rounds`` times; the
    RSS is sampled after each call of the two windows.
    """
    for _ in range(warmup_rounds):
        run_round()
    windows: list[list[int]] = [[], []]
    for window in windows:
        for _ in range(window_rounds):
            run_round()
            gc.collect()
            window.append(rss_bytes())
    return int(statistics.median(windows[1]) - statistics.median(windows[0]))


def probe_growth(kind: str, *, branches: int, warmup_rounds: int, window_rounds: int) -> int:
    """``late_growth`` of an inline fan-out whose branches each keep 8 KiB.

    ``kind`` "leak" keeps them for good; "bounded" keeps them in a history
    that is full five rounds after the warm-up. Meant for a fresh
    interpreter: in a process that has freed memory before, new allocations
    reuse pages that are already resident and the RSS does not move.
    """
    import collections

    from isobranch import StateGraph

    kept: list[bytes] | collections.deque[bytes] = (
        [] if kind == "leak" else collections.deque(maxlen=branches * (warmup_rounds + 5)))
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_fan_in_node("join", lambda state, results: {})
    for index in range(branches):
        graph.add_node(f"b{index}", lambda state: kept.append(b"x" * 8192))
        graph.add_parallel_edge("start", f"b{index}", fan_in="join")
    graph.set_entry_point("start")
    with graph.compile(isolation="inline") as compiled:
        growth = late_growth(lambda: compiled.invoke({}), warmup_rounds=warmup_rounds,
                             window_rounds=window_rounds)
    if kind == "bounded":
        assert len(kept) == kept.maxlen
    return growth
