"""What ``isobranch state`` and ``isobranch history`` print, and pending interrupts as JSON.

``state`` prints one JSON object; ``history`` a table (step, recorded time,
node), or with ``--json`` one JSON object per step with its state. Values
that JSON lacks are written as the run's JSON output writes them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .run_history import StepRecord

HISTORY_COLUMNS = ("step", "recorded", "node")


def interrupt_json(interrupt: Any) -> dict[str, Any]:
    """A pending ``Interrupt`` as the command prints it: ``id``, ``value``, ``node``, ``branch``."""
    return {"id": interrupt.id, "value": interrupt.value, "node": interrupt.node,
            "branch": interrupt.branch}


def state_json(run_id: str, *, status: str, step: int, next_nodes: Sequence[str] | None,
               interrupts: Sequence[Any], values: dict) -> dict[str, Any]:
    """``isobranch state``'s object; ``next_nodes`` None: not worked out (no workflow given)."""
    return {"run_id": run_id, "status": status, "step": step,
            "next": None if next_nodes is None else list(next_nodes),
            "interrupts": [interrupt_json(i) for i in interrupts], "values": values}


def history_table(records: Sequence[StepRecord]) -> str:
    """``records`` as aligned columns: step, when it was recorded (UTC), node."""
    rows = [HISTORY_COLUMNS, *((str(r.step), _time(r.time), r.node) for r in records)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HISTORY_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                               ).rstrip() for row in rows)


def step_json(record: StepRecord) -> dict[str, Any]:
    """One step as ``history --json`` prints it."""
    return {"step": record.step, "node": record.node, "time": record.time,
            "state": record.state}


def _time(seconds: float) -> str:
    milliseconds = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"
