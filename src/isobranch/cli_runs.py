"""The table ``isobranch runs DB`` prints: one line per recorded run."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .checkpoint.store import RunInfo

COLUMNS = ("id", "graph", "status", "started", "duration", "branches")


def runs_table(runs: Sequence[RunInfo]) -> str:
    """``runs`` as aligned text columns: id, graph, status, started (UTC), duration,
    branches done/total; a line saying so when there is none."""
    if not runs:
        return "no runs recorded"
    rows = [COLUMNS, *([run.run_id, run.graph or "-", str(run.status), _time(run.started_at),
                        _duration(run.duration), f"{run.branches_done}/{run.branches_total}"]
                       for run in runs)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                               ).rstrip() for row in rows)


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
