"""What ``stream(mode=...)`` yields: the stream modes and the small events of ``updates`` mode.

``events`` (the default) is every event with the states in them;
``updates`` keeps each event small whatever the size of the state or the
number of branches (a node's event carries what the node returned, a
fan-out's only counts); ``values`` is one event per main-path step with
the whole state. The step loop (runner.py) builds the events of the mode
it is given, so no mode builds an event it then drops for being too big.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from .branch import ParallelFlowResult
from .errors import ConfigError

# How many failed branches an ``updates`` mode ``parallel`` event names (then only counts).
FAILED_BRANCHES_NAMED = 10


class StreamMode(StrEnum):
    """What each event of a stream carries (each member equals its string)."""

    EVENTS = "events"  # every event; node events carry a copy of the state
    UPDATES = "updates"  # small events: a node's update, a fan-out's counts, no states
    VALUES = "values"  # one event per main-path step with the whole state, then the final


# The events a ``values`` stream keeps (``run``: the id of a recorded run).
VALUES_EVENT_TYPES = frozenset({"run", "node", "final"})


def stream_mode(mode: StreamMode | str) -> StreamMode:
    """``mode`` as a ``StreamMode``; ``ConfigError`` (a ``ValueError``) naming it and the modes."""
    try:
        return StreamMode(mode)
    except ValueError:
        raise ConfigError(f"unknown stream mode {mode!r}; the modes are "
                          f"{', '.join(m.value for m in StreamMode)}") from None


def parallel_summary(fan_out: str, fan_in: str, results: Sequence[ParallelFlowResult]
                     ) -> dict[str, Any]:
    """The ``parallel`` event of ``updates`` mode: counts and the names of a few failed
    branches (at most ``FAILED_BRANCHES_NAMED``, in branch order), never a state."""
    failed = [result.branch for result in results if not result.success]
    return {"type": "parallel", "fan_out": fan_out, "fan_in": fan_in, "total": len(results),
            "succeeded": len(results) - len(failed), "failed": len(failed),
            "failed_branches": failed[:FAILED_BRANCHES_NAMED]}


def update_event(node: str, update: Any) -> dict[str, Any]:
    """The ``node`` event of ``updates`` mode: what ``node`` returned (``{}`` for None)."""
    return {"type": "node", "node": node, "update": dict(update) if update else {}}
