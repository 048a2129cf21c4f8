"""Benchmark rows for checkpointed runs, each measured side by side with the same run unrecorded."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from isobranch import SqliteCheckpointer

from .cases import Row, round_robin_best
from .map_cases import _check, map_graph


def map_with_checkpointer(isolation: str = "process", items: int = 1_000, workers: int = 2,
                          repeat: int = 5) -> Row:
    """A map of trivial items recorded by a checkpointer against the same map without one."""
    values = list(range(items))
    directory = Path(tempfile.mkdtemp(prefix="isobranch-bench-"))
    run_ids = (f"bench-{n}" for n in itertools.count())
    try:
        checkpointer = SqliteCheckpointer(directory / "runs.db")
        with map_graph(isolation, workers) as plain, \
                map_graph(isolation, workers, checkpointer=checkpointer) as recorded:
            _check(plain.invoke({"items": values}), values)
            _check(recorded.invoke({"items": values}, config={"run_id": next(run_ids)}), values)
            baseline, measured = round_robin_best(
                [lambda: plain.invoke({"items": values}),
                 lambda: recorded.invoke({"items": values}, config={"run_id": next(run_ids)})],
                repeat)
            run = checkpointer.list_runs()[-1]
            assert (run.branches_done, run.branches_total) == (items, items), run
        checkpointer.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ratio = measured / baseline
    limit = 1.5 if isolation == "process" else None
    return Row(f"map of {items:,} trivial items with a checkpointer, {isolation} backend",
               "<= 1.5x without one" if limit else "comparison", baseline, measured, ratio,
               ratio <= limit if limit else True,
               f"without {baseline / items * 1000:.3f} ms/item, "
               f"with {measured / items * 1000:.3f} ms/item")
