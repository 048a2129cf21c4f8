"""Property: the order in which branches finish never changes the merged state."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Annotated, TypedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isobranch import (
    END,
    START,
    ParallelFlowResult,
    StateGraph,
    register_backend,
    unregister_backend,
)
from isobranch.branch import BranchTask
from isobranch.branch_run import run_branch

BACKEND = "completion-order-test"


class OutOfOrder:
    """Runs every branch, then reports them in the completion order it was given."""

    name = BACKEND

    def __init__(self, max_workers: int | None = None, order: tuple[int, ...] = ()) -> None:
        self.order = order

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        results = [run_branch(task) for task in tasks]
        order = list(self.order) if sorted(self.order) == list(range(len(results))) \
            else list(range(len(results)))
        for position in order:
            yield position, results[position]

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        return [run_branch(task) for task in tasks]

    def close(self) -> None:
        pass


class Merged(TypedDict, total=False):
    items: Annotated[list, "append"]
    doubled: Annotated[list, operator.add]
    by_key: Annotated[dict, "merge"]
    total: Annotated[int, "sum"]
    low: Annotated[int, "min"]
    high: Annotated[int, "max"]


def work(state: dict) -> dict:
    item = state["item"]
    if item % 5 == 0:
        raise ValueError(f"item {item} fails")  # a failed branch contributes nothing
    return {"items": item, "by_key": {str(item % 3): item}, "total": item, "low": item,
            "high": item}


def work_more(state: dict) -> dict:
    return {"doubled": [state["item"] * 2], "items": [-state["item"]]}


def build() -> StateGraph:
    graph = StateGraph(Merged)
    graph.add_node("split", lambda state: None)
    graph.add_node("work", work)
    graph.add_node("work_more", work_more)
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "work", over="numbers", fan_in="join")
    graph.add_edge("work", "work_more")
    graph.add_edge("work_more", "join")
    graph.add_edge("join", END)
    return graph


@pytest.fixture(scope="module", autouse=True)
def out_of_order_backend() -> Iterator[None]:
    register_backend(BACKEND, OutOfOrder)
    yield
    unregister_backend(BACKEND)


def expected(numbers: list[int]) -> dict:
    """The merge in item order, computed directly."""
    kept = [n for n in numbers if n % 5]
    state = {"numbers": numbers, "items": ["start"] + [x for n in kept for x in (n, -n)],
             "total": 100 + sum(kept)}
    if kept:
        state.update(doubled=[n * 2 for n in kept], by_key={str(n % 3): n for n in kept},
                     low=min(kept), high=max(kept))
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), numbers=st.lists(st.integers(-50, 50), max_size=12))
def test_any_completion_order_gives_the_same_merged_state(data, numbers):
    order = data.draw(st.permutations(range(len(numbers))), label="completion order")
    graph = build()
    with graph.compile(isolation=BACKEND, order=tuple(order)) as shuffled, \
            graph.compile(isolation=BACKEND) as in_order:
        start = {"numbers": numbers, "items": ["start"], "total": 100}
        got = shuffled.invoke(start)
        assert got == in_order.invoke(start)
    assert got == expected(numbers)
