"""Differential test: generated graphs of every shape the docs allow run on inline, thread
and process exactly as the reference interpreter (reference_interpreter.py) runs them.

The graphs (shape_graphs.py) chain static and map fan-outs, nest them,
let fan-in nodes fan out again, reach fan-outs through conditional edges
and bounded loops, and end branches early; a few nodes fail. A graph's
outcome — its final state, which records every node that ran and what
every branch left, or the node a failed run names — must equal the
reference's. A mismatch fails with the graph as a YAML file that
``isobranch run`` takes.

One example is a batch of graphs joined into one document, so each
example compiles one graph and, on process, starts one worker pool.
ISOBRANCH_SHAPE_EXAMPLES multiplies the number of examples for a longer
run (e.g. 20).
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isobranch import GraphExecutionError, SqliteCheckpointer, YAMLEngine
from reference_interpreter import ReferenceFailure, ReferenceGraph
from shape_graphs import batch, batches, graphs, shapes_of, to_yaml

SCALE = int(os.environ.get("ISOBRANCH_SHAPE_EXAMPLES", "1"))
# (examples, fewest graphs per example, most): several hundred graphs in all;
# process examples are fewer and larger, as each starts a worker pool.
PLAN = {"inline": (40, 1, 8), "thread": (40, 1, 8), "process": (5, 6, 12)}


def engine_outcome(graph, case: int) -> tuple:
    """The final state of running graph ``case`` of the batch, or where it failed."""
    try:
        return ("final", graph.invoke({"case": case}))
    except GraphExecutionError as exc:
        return ("failed", exc.node, exc.error_type)


def reference_outcome(reference: ReferenceGraph, case: int) -> tuple:
    """The same as ``engine_outcome``, by the reference interpreter."""
    try:
        return ("final", reference.run({"case": case}))
    except ReferenceFailure as failure:
        return ("failed", failure.node, failure.error_type)


def describe(document: dict, isolation: str, expected: tuple, actual: tuple) -> str:
    lines = [f"on {isolation}, this graph ends differently than the reference says:", "",
             to_yaml(document), f"reference: {expected[:1] + expected[2:]}",
             f"engine:    {actual[:1] + actual[2:]}"]
    if expected[0] == actual[0] == "final":
        want, got = expected[1], actual[1]
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                lines.append(f"  state[{key!r}]: reference {want.get(key)!r}, "
                             f"engine {got.get(key)!r}")
    return "\n".join(lines)


@pytest.mark.timeout(300 * SCALE)  # room for hypothesis to shrink a failing batch
@pytest.mark.parametrize("isolation", list(PLAN))
def test_generated_graphs_end_as_the_reference_interpreter_says(isolation):
    examples, fewest, most = PLAN[isolation]
    graphs_run = []

    @settings(max_examples=examples * SCALE, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(documents=batches(fewest, most))
    def check(documents: list[dict]) -> None:
        combined = batch(documents)
        reference = ReferenceGraph(combined)
        with YAMLEngine(isolation=isolation, max_workers=2).load_from_dict(combined) as graph:
            for case, document in enumerate(documents):
                expected = reference_outcome(reference, case)
                actual = engine_outcome(graph, case)
                assert actual == expected, describe(document, isolation, expected, actual)
        graphs_run.append(len(documents))

    check()
    print(f"{sum(graphs_run)} generated graphs on {isolation}")


def resumed_outcome(graph, case: int, run_id: str, stop_after: int) -> tuple:
    """Like ``engine_outcome``, but the run is interrupted after event ``stop_after`` (when
    it gets that far) and then resumed from its checkpoints."""
    try:
        events = graph.stream({"case": case}, config={"run_id": run_id})
        for seen, event in enumerate(events, 1):
            if event["type"] == "final":
                return ("final", event["state"])
            if seen == stop_after:
                break
        events.close()
        return ("final", graph.resume(run_id))
    except GraphExecutionError as exc:
        return ("failed", exc.node, exc.error_type)


def stops_worth_trying(graph, case: int, document: dict, pick: int) -> list[int]:
    """Where to interrupt graph ``case``: after each step whose fan-out comes next (the
    hardest point to resume from, a fan-in node's most of all), and at one more event."""
    fans_out = {edge["from"] for edge in document["edges"]
                if edge.get("type") in ("parallel", "map")}
    try:
        events = list(graph.stream({"case": case}))
    except GraphExecutionError:
        return [pick]
    stops = [seen for seen, event in enumerate(events, 1)
             if event["type"] == "node" and event["node"] in fans_out]
    return sorted({*stops, pick % len(events) + 1})


@pytest.mark.timeout(300 * SCALE)  # room for hypothesis to shrink a failing batch
def test_generated_graphs_interrupted_and_resumed_end_as_the_reference_says(tmp_path):
    graphs_run = []

    @settings(max_examples=12 * SCALE, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(documents=batches(1, 6), picks=st.lists(st.integers(0, 99), min_size=6, max_size=6))
    def check(documents: list[dict], picks: list[int]) -> None:
        combined = batch(documents)
        reference = ReferenceGraph(combined)
        checkpointer = SqliteCheckpointer(tmp_path / f"{uuid.uuid4().hex}.db")
        engine = YAMLEngine(isolation="inline", checkpointer=checkpointer)
        with engine.load_from_dict(combined) as graph:
            for case, document in enumerate(documents):
                expected = reference_outcome(reference, case)
                for stop in stops_worth_trying(graph, case, document, picks[case]):
                    actual = resumed_outcome(graph, case, f"{case}-{stop}", stop)
                    where = f"inline, interrupted after event {stop} and resumed"
                    assert actual == expected, describe(document, where, expected, actual)
        graphs_run.append(len(documents))

    check()
    print(f"{sum(graphs_run)} generated graphs interrupted and resumed")


EVERY_SHAPE = {
    "a fan-in node with a parallel edge", "a fan-in node with a map edge",
    "a fan-in node that fans out in a branch", "a nested parallel fan-out", "a nested map fan-out",
    "a map over a key", "a map over an expression", "a map with as and index_as", "an empty map",
    "a conditional edge into a fan-out", "a loop back into a fan-out",
    "a loop turning back at a fan-in node", "a fan-in node routing by conditions",
    "a branch ending at __end__", "a node that fails",
}


def test_the_generator_makes_every_shape_the_differential_test_names():
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(document=graphs())
    def collect(document: dict) -> None:
        seen.update(shapes_of(document))

    collect()
    assert EVERY_SHAPE - seen == set()
    assert seen == EVERY_SHAPE, "a shape that shapes_of finds is missing from EVERY_SHAPE"
