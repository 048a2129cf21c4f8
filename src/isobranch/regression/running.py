"""Running one case: the agent's final state or error, its route and its fan-outs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..branch import route_step
from ..errors import GraphError, GraphExecutionError
from ..replay import Tape
from ..subgraph import PATH_SEPARATOR, join_path
from .text import short

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What one run of an agent did: its final state or its error, and its route.

    ``route`` is the route as a report shows it (``start``, ``[a | b]`` …);
    ``steps`` is the same run as data, for graph coverage: the main path's
    completed nodes and, per fan-out, its branches as ``branch.route_step``
    gives them (what each branch ran). ``duration_ms`` is the run's wall time.
    """

    final: dict | None = None
    error: GraphExecutionError | GraphError | None = None
    route: list[str] = field(default_factory=list)
    fan_outs: list[tuple[str | None, list[Any]]] = field(default_factory=list)
    steps: list[Any] = field(default_factory=list)
    duration_ms: float = 0.0


def run_agent_case(graph: Any, state: Mapping[str, Any], *, label: str = "case",
                   replay: Tape | None = None) -> RunRecord:
    """Run a compiled graph on ``state``, recording the route and every fan-out.

    ``stream`` rather than ``invoke``: when a fan-in node later fails, the
    report can still say which branch failed before it. ``label`` names the
    case in the DEBUG records logged when it starts and finishes; ``replay``
    is the run's tape of recorded nodes (replay.py).
    """
    record = RunRecord()
    last_node: str | None = None
    log.debug("%s: started on input %s", label, short(dict(state)))
    started = time.perf_counter()
    try:
        for event in graph.stream(dict(state), config={"replay": replay} if replay is not None else None):
            kind = event["type"]
            if kind == "node":
                last_node = event["node"]
                record.route.append(last_node)
                record.steps.append(last_node)
            elif kind == "parallel":
                branches = list(event["branches"])
                # A fan-out inside a main-path subgraph node: its fan-in is a path
                # (``review/done``), its branches are named under the same prefix.
                prefix, _, fan_in = event["fan_in"].rpartition(PATH_SEPARATOR)
                inner = fan_in not in graph.nodes or bool(prefix)
                record.fan_outs.append((last_node, branches))
                if not inner:
                    # Coverage counts this agent's own fan-outs; an inner one is the inner agent's.
                    record.steps.append(route_step(branches))
                record.route.append("[" + " | ".join(
                    join_path(prefix, r.branch)
                    + ("" if r.success else " (timed out)" if r.timed_out else " (failed)")
                    for r in branches) + "]")
            elif kind == "final":
                record.final = event["state"]
    except (GraphExecutionError, GraphError) as exc:
        record.error = exc
        # A fan-out stopped by fail_fast has no 'parallel' event; its error holds the results.
        # (A fan-in node that fails after its 'parallel' event carries those results too.)
        results = getattr(exc, "results", None)
        if results and not (record.steps and isinstance(record.steps[-1], tuple)):
            record.steps.append(route_step([r for r in results if r is not None]))
    record.duration_ms = (time.perf_counter() - started) * 1000
    outcome = "succeeded" if record.error is None else f"failed ({type(record.error).__name__})"
    log.debug("%s: %s in %.3f s, route: %s", label, outcome, record.duration_ms / 1000,
              " -> ".join(record.route) or "(none)")
    return record
