"""State schemas: declared types and reducers, from Python and YAML, on every backend."""

from __future__ import annotations

import operator
import pickle
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NewType, Optional, Protocol, TypedDict, TypeVar

import cloudpickle
import pytest

from isobranch import (
    END,
    START,
    GraphError,
    GraphExecutionError,
    ParallelFlowResult,
    StateGraph,
    YAMLEngine,
)
from isobranch.nodes import LuaNode


class Annotated_(TypedDict):
    results: Annotated[list, operator.add]


def two_branches(schema: Any, a: Any, b: Any, fan_in: Any = None) -> StateGraph:
    graph = StateGraph(schema)
    graph.add_node("start", lambda state: None)
    graph.add_node("a", a)
    graph.add_node("b", b)
    graph.add_fan_in_node("join", fan_in or (lambda state, results: None))
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "a", fan_in="join")
    graph.add_parallel_edge("start", "b", fan_in="join")
    graph.add_edge("a", "join")
    graph.add_edge("b", "join")
    graph.add_edge("join", END)
    return graph


def test_typeddict_annotated_reducer_combines_each_branch_write(isolation):
    graph = two_branches(Annotated_, lambda s: {"results": ["a"]}, lambda s: {"results": ["b"]})
    with graph.compile(isolation=isolation) as app:
        assert app.invoke({"results": ["init"]}) == {"results": ["init", "a", "b"]}


def test_every_built_in_reducer_combines_branch_writes_in_branch_order(isolation):
    # "last" has no reducer: replaced, as without a schema.
    schema = {"items": "append", "more": "extend", "seen": "merge", "total": "sum",
              "low": "min", "high": "max"}

    def a(state):
        return {"items": "a", "more": [1, 2], "seen": {"a": 1, "both": "a"}, "total": 2,
                "low": 5, "high": 5, "last": "a"}

    def b(state):
        return {"items": ["b1", "b2"], "more": [3], "seen": {"b": 2, "both": "b"}, "total": 3,
                "low": 1, "high": 9, "last": "b"}

    def join(state, results):
        return {"seen_by_fan_in": dict(state)}

    with two_branches(schema, a, b, join).compile(isolation=isolation) as app:
        final = app.invoke({"total": 10, "low": 3, "high": 7, "last": "init"})
    assert final["items"] == ["a", "b1", "b2"]           # a non-list is one element
    assert final["more"] == [1, 2, 3]
    assert final["seen"] == {"a": 1, "b": 2, "both": "b"}
    assert (final["total"], final["low"], final["high"]) == (15, 1, 9)
    assert final["last"] == "init"                        # no reducer: only the fan-in's return
    assert final["seen_by_fan_in"]["items"] == ["a", "b1", "b2"]   # combined before it ran


MAP_YAML = """
state_schema:
  scores: {type: list, reducer: append}
  total: {type: int, reducer: sum}
  docs: list
nodes:
  - name: split
    run: |
      return {"docs": [{"id": i, "words": i % 7} for i in range(120)]}
  - name: score
    language: lua
    run: |
      return {scores = {state.doc.id}, total = state.doc.words}
  - name: collect
    fan_in: true
    run: |
      return {"count": len(parallel_results)}
edges:
  - {from: __start__, to: split}
  - {from: split, to: score, type: map, over: docs, as: doc, fan_in: collect}
  - {from: score, to: collect}
"""


def test_map_branches_build_one_list_in_item_order_without_fan_in_code(load):
    final = load(MAP_YAML).invoke({})
    assert final["scores"] == list(range(120))
    assert final["total"] == sum(i % 7 for i in range(120))
    assert final["count"] == 120


def test_reducers_apply_to_every_update_on_the_main_path_too():
    graph = StateGraph({"log": "append", "n": "sum"})
    graph.add_node("one", lambda s: {"log": "one", "n": 1})
    graph.add_node("two", lambda s: {"log": ["two"], "n": 2})
    graph.add_edge(START, "one")
    graph.add_edge("one", "two")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({"log": None}) == {"log": ["one", "two"], "n": 3}


def test_a_branch_sees_its_own_writes_reduced_and_the_fan_in_only_their_sum(isolation):
    def a(state):
        return {"results": ["a"]}

    def a_again(state):
        return {"results": ["a2"], "own": list(state["results"])}

    graph = StateGraph(Annotated_)
    graph.add_node("start", lambda s: None)
    graph.add_node("a", a)
    graph.add_node("a_again", a_again)
    graph.add_node("b", lambda s: {"results": ["b"]})
    graph.add_fan_in_node("join", lambda s, rs: {"own": rs[0]["own"]})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "a", fan_in="join")
    graph.add_parallel_edge("start", "b", fan_in="join")
    graph.add_edge("a", "a_again")
    graph.add_edge("a_again", "join")
    graph.add_edge("b", "join")
    with graph.compile(isolation=isolation) as app:
        final = app.invoke({"results": ["init"]})
    assert final["own"] == ["init", "a"]                 # the branch's own reduced state
    assert final["results"] == ["init", "a", "a2", "b"]  # its writes, not its whole state


def test_a_failed_branch_writes_nothing_and_its_state_stays_in_its_result(isolation):
    def fails(state):
        raise ValueError("no")

    graph = StateGraph({"results": "append"})
    graph.add_node("start", lambda s: None)
    graph.add_node("a", lambda s: {"results": ["a"]})
    graph.add_node("half", lambda s: {"results": ["half"]})
    graph.add_node("fails", fails)
    graph.add_fan_in_node("join", lambda s, rs: {
        "failed_state": rs[1].state.get("results"), "writes": [r.reducer_writes for r in rs]})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "a", fan_in="join")
    graph.add_parallel_edge("start", "half", fan_in="join")
    graph.add_edge("half", "fails")
    with graph.compile(isolation=isolation, fail_fast=False) as app:
        final = app.invoke({})
    assert final["results"] == ["a"]
    assert final["failed_state"] == ["half"]
    assert final["writes"] == [[("results", ["a"])], []]


def test_nested_fan_out_writes_reach_the_outer_fan_in_in_order(isolation):
    graph = StateGraph({"results": "append"})
    graph.add_node("start", lambda s: {"groups": [[1, 2], [3, 4]]})
    graph.add_node("group", lambda s: {"members": s["item"]})
    graph.add_node("member", lambda s: {"results": [s["item"] * 10]})
    graph.add_fan_in_node("inner", lambda s, rs: {"results": ["end of group"]})
    graph.add_fan_in_node("outer", lambda s, rs: None)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "group", over="groups", fan_in="outer")
    graph.add_map_edge("group", "member", over="members", fan_in="inner")
    graph.add_edge("inner", "outer")
    with graph.compile(isolation=isolation) as app:
        final = app.invoke({})
    assert final["results"] == [10, 20, "end of group", 30, 40, "end of group"]


def test_stream_snapshots_keep_the_list_they_saw_when_the_fan_in_combines():
    graph = two_branches({"results": "append"}, lambda s: {"results": ["a"]},
                         lambda s: {"results": ["b"]})
    with graph.compile(isolation="inline") as app:
        events = list(app.stream({"results": ["init"]}))
    start = next(e for e in events if e["type"] == "node" and e["node"] == "start")
    assert start["state"]["results"] == ["init"]
    assert events[-1]["state"]["results"] == ["init", "a", "b"]


# -- types --------------------------------------------------------------------


def test_a_type_mismatch_in_a_branch_names_node_branch_key_expected_and_got(isolation):
    graph = two_branches({"count": int}, lambda s: {"count": 1},
                         lambda s: {"count": "three", "other": 1})
    with graph.compile(isolation=isolation, fail_fast=True) as app, \
            pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    exc = caught.value
    assert (exc.node, exc.branch, exc.error_type) == ("b", "b", "StateTypeError")
    assert "node 'b' in branch 'b': state key 'count' must be int, got str 'three'" in str(exc)
    assert "other" not in exc.state                       # all or nothing


def test_a_type_mismatch_on_the_main_path_leaves_the_state_as_it_was():
    graph = StateGraph({"n": {"type": "int", "reducer": "sum"}})
    graph.add_node("one", lambda s: {"n": 1, "note": "kept?"})
    graph.add_node("two", lambda s: {"n": 0.5, "note": "not kept"})
    graph.add_edge(START, "one")
    graph.add_edge("one", "two")
    with graph.compile(isolation="inline") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    exc = caught.value
    assert exc.node == "two" and exc.branch is None
    assert "state key 'n' must be int, got float 1.5 (after reducer 'sum'" in str(exc)
    assert exc.state == {"n": 1, "note": "kept?"}


def test_the_input_state_is_type_checked():
    graph = StateGraph({"count": int, "name": Optional[str]})  # noqa: UP045 (typing's form)
    graph.add_node("a", lambda s: None)
    graph.set_entry_point("a")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({"count": 1, "name": None}) == {"count": 1, "name": None}
        with pytest.raises(GraphError, match=r"the input state: state key 'count' must be int"):
            app.invoke({"count": "1"})


Kind = NewType("Kind", str)


class Inner(TypedDict):
    x: int


class Typed(TypedDict, total=False):
    ratio: float
    flag: bool
    count: int
    mode: Literal["fast", "slow"]
    ids: list[int]
    kind: Kind
    inner: Inner
    anything: Any
    either: int | str


@pytest.mark.parametrize(("key", "value", "ok"), [
    ("ratio", 1, True), ("ratio", 1.5, True), ("ratio", True, False), ("ratio", "1", False),
    ("count", True, False), ("count", 2, True), ("count", 2.0, False),
    ("flag", True, True), ("flag", 1, False),
    ("mode", "fast", True), ("mode", "medium", False),
    ("ids", ["not", "checked"], True), ("ids", (1, 2), False),   # the origin class only
    ("kind", "k", True), ("kind", 3, False), ("inner", {"x": "y"}, True), ("inner", [], False),
    ("anything", object(), True), ("either", "s", True), ("either", 1.5, False),
    ("count", None, False),
])
def test_declared_python_types_check_the_class_of_each_value(key, value, ok):
    graph = StateGraph(Typed)
    graph.add_node("set", lambda s: {key: value})
    graph.set_entry_point("set")
    with graph.compile(isolation="inline") as app:
        if ok:
            assert app.invoke({})[key] is value
        else:
            with pytest.raises(GraphExecutionError, match=f"state key '{key}' must be"):
                app.invoke({})


def test_yaml_type_names_and_unions():
    document = {"state_schema": {"a": "float", "b": "str|None", "c": "number", "d": "any",
                                 "e": "Boolean"},
                "nodes": [{"name": "n", "run": "return state['out']"}]}
    with YAMLEngine(isolation="inline").load_from_dict(document) as app:
        assert app.invoke({"out": {"a": 1, "b": None, "c": 2.5, "d": [1], "e": False}})["a"] == 1
        for bad in ({"b": 3}, {"e": 0}, {"a": "x"}):
            with pytest.raises(GraphExecutionError, match="must be"):
                app.invoke({"out": bad})


# -- schemas that cannot be honoured --------------------------------------------


def yaml_problems(schema: Any) -> list[str]:
    document = {"state_schema": schema, "nodes": [{"name": "n", "run": "return {}"}]}
    return YAMLEngine(isolation="inline").validate_dict(document, source="agent.yaml")


def test_unknown_yaml_type_and_reducer_names_fail_at_load_with_suggestions():
    problems = yaml_problems({"a": "lst", "b": {"type": "list", "reducer": "apend"},
                              "c": {"type": "int", "reduce": "sum"}, "d": {}})
    text = "\n".join(problems)
    assert "state_schema.a: unknown type 'lst'" in text and "did you mean 'list'?" in text
    assert "state_schema.b: unknown reducer 'apend'" in text and "did you mean 'append'?" in text
    assert "state_schema.c.reduce: unknown key" in text and "did you mean 'reducer'?" in text
    assert "state_schema.d: give a 'type', a 'reducer' or both" in text
    assert all(p.startswith("agent.yaml: ") for p in problems)


def test_a_reducer_whose_results_the_type_refuses_is_an_error():
    problems = yaml_problems({"n": {"type": "int", "reducer": "append"}})
    assert problems == ["agent.yaml: state_schema.n: reducer 'append' makes a list, which type "
                        "int does not accept"]
    assert yaml_problems(["results"]) == [
        "agent.yaml: state_schema: must be a mapping of state keys, got list"]


T = TypeVar("T")


class Shaped(Protocol):
    def area(self) -> float: ...


class WithTypeVar(TypedDict):
    value: T  # type: ignore[valid-type]


class WithProtocol(TypedDict):
    shape: Shaped


class WithMetadata(TypedDict):
    text: Annotated[str, "a description, not a reducer"]


class TwoReducers(TypedDict):
    n: Annotated[int, operator.add, max]


@pytest.mark.parametrize(("schema", "message"), [
    (WithTypeVar, "state_schema WithTypeVar.value: cannot check type ~T"),
    (WithProtocol, "state_schema WithProtocol.shape: cannot check type"),
    (WithMetadata, "cannot honour annotation metadata 'a description, not a reducer'"),
    (TwoReducers, "2 reducers in one annotation"),
    ({"n": "apend"}, "state_schema['n']: unknown reducer 'apend'"),
    ({"n": 3}, "state_schema['n']: expected a reducer"),
    ({"n": Annotated[int, "append"]}, "reducer 'append' makes a list, which type int"),
    (int, "state_schema must be a TypedDict class or a dict"),
    ({"n": Optional[Annotated[list, operator.add]]},  # noqa: UP045 (typing's form)
     "inside another type is not read; put it outermost"),
])
def test_a_python_schema_that_cannot_be_honoured_is_a_graph_error(schema, message):
    with pytest.raises(GraphError) as caught:
        StateGraph(schema)
    assert message in str(caught.value)


def test_callable_reducers_start_from_the_declared_types_empty_value():
    class Counts(TypedDict):
        total: Annotated[int, lambda old, new: old + new]
        tags: Annotated[list, lambda old, new: [*old, new]]
        first: Annotated[Any, lambda old, new: old]

    graph = StateGraph(Counts)
    graph.add_node("a", lambda s: {"total": 2, "tags": "x", "first": "one"})
    graph.add_node("b", lambda s: {"total": 3, "tags": "y", "first": "two"})
    graph.add_edge(START, "a")
    graph.add_edge("a", "b")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({}) == {"total": 5, "tags": ["x", "y"], "first": "one"}


def test_a_reducer_that_cannot_combine_an_update_names_the_key_and_reducer():
    graph = StateGraph({"seen": "merge"})
    graph.add_node("a", lambda s: {"seen": ["not", "a", "dict"]})
    graph.set_entry_point("a")
    with graph.compile(isolation="inline") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert caught.value.error_type == "ReducerError"
    assert ("node 'a': state key 'seen': reducer 'merge' failed: reducer 'merge' needs a dict "
            "update, got a list") in str(caught.value)


def test_a_lua_empty_table_is_an_empty_list_for_a_list_key(isolation):
    graph = StateGraph({"items": list, "log": "append", "table": dict})
    graph.add_node("lua", LuaNode("lua", "return {items = {}, log = {}, table = {}}"))
    graph.set_entry_point("lua")
    with graph.compile(isolation=isolation) as app:
        assert app.invoke({"log": ["x"]}) == {"items": [], "log": ["x"], "table": {}}


# -- ParallelFlowResult as a mapping ------------------------------------------------


def test_result_dict_access_falls_back_to_the_branch_state_and_fields_win():
    result = ParallelFlowResult(branch="b", state={"score": 3, "branch": "shadowed", "n": None})
    assert result["score"] == 3 and result.get("score") == 3 and "score" in result
    assert result["branch"] == "b"                        # a field wins over a state key
    assert result.get("missing") is None and result.get("missing", 0) == 0
    assert "missing" not in result
    with pytest.raises(KeyError):
        result["missing"]
    assert result["n"] is None and "n" in result
    assert isinstance(result, Mapping)
    assert list(result) == list(result.keys()) == list(ParallelFlowResult.__dataclass_fields__)
    assert "score" not in dict(result) and dict(result)["state"]["score"] == 3
    assert len(result) == len(ParallelFlowResult.__dataclass_fields__)
    assert not hasattr(result, "__dict__")                # still slotted
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        assert loads(dumps(result)) == result


def test_peer_style_fan_in_reads_state_keys_from_results(load):
    graph = load("""
    state_schema: {marker: str}
    nodes:
      - {name: start, run: "return {}"}
      - {name: a, run: "return {'marker': 'a', 'saw_value': 1}"}
      - {name: b, run: "return {'marker': 'b'}"}
      - name: join
        fan_in: true
        run: |
          return {"values": [r.get("saw_value") for r in parallel_results],
                  "markers": [r["marker"] for r in parallel_results],
                  "has": ["saw_value" in r for r in parallel_results]}
    edges:
      - {from: start, to: a, type: parallel, fan_in: join}
      - {from: start, to: b, type: parallel, fan_in: join}
    """)
    final = graph.invoke({})
    assert final["values"] == [1, None]
    assert final["markers"] == ["a", "b"]
    assert final["has"] == [True, False]


class Point:
    """A custom class as a declared type (pickled by reference to worker processes)."""

    def __init__(self, x: int) -> None:
        self.x = x


def test_callable_reducers_and_custom_types_work_on_every_backend(isolation):
    class WithCallable(TypedDict, total=False):
        longest: Annotated[str, lambda old, new: max(old, new, key=len)]
        where: Point

    graph = two_branches(WithCallable, lambda s: {"longest": "abc", "where": Point(1)},
                         lambda s: {"longest": "abcdef"},
                         lambda s, rs: {"x": rs[0].state["where"].x})
    with graph.compile(isolation=isolation) as app:
        final = app.invoke({"longest": "ab"})
    assert final["longest"] == "abcdef" and final["x"] == 1


def test_a_killed_process_branch_reports_its_state_with_reducers_applied():
    graph = StateGraph({"results": "append"})
    graph.add_node("start", lambda s: None)
    graph.add_node("first", lambda s: {"results": ["first"]})
    graph.add_node("spin", LuaNode("spin", "while true do end"))
    graph.add_fan_in_node("join", lambda s, rs: {"failed": rs[0]})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "first", fan_in="join")
    graph.add_edge("first", "spin")
    with graph.compile(isolation="process", branch_timeout=1.0) as app:
        final = app.invoke({"results": ["init"]})
    failed = final["failed"]
    assert failed.timed_out and failed.node == "spin"
    # The worker was killed; the parent rebuilt the state from what each node set.
    assert failed.state["results"] == ["init", "first"]
    assert final["results"] == ["init"]                   # a failed branch writes nothing


def test_a_lua_only_agent_may_declare_a_schema_with_reducers(isolation):
    document = {
        "state_schema": {"words": "list", "lengths": {"type": "list", "reducer": "append"},
                         "longest": {"type": "int", "reducer": "max"}},
        "nodes": [
            {"name": "start", "language": "lua", "run": "return {}"},
            {"name": "measure", "language": "lua",
             "run": "return {lengths = {#state.word}, longest = #state.word}"},
            {"name": "done", "fan_in": True, "language": "lua",
             "run": "return {count = #state.parallel_results}"},
        ],
        "edges": [{"from": "start", "to": "measure", "type": "map", "over": "words",
                   "as": "word", "fan_in": "done"},
                  {"from": "measure", "to": "done"}],
    }
    engine = YAMLEngine(isolation=isolation, allow_python=False)
    with engine.load_from_dict(document) as app:
        final = app.invoke({"words": ["a", "abc", "ab"]})
    assert (final["lengths"], final["longest"], final["count"]) == ([1, 3, 2], 3, 3)


def test_a_misspelt_state_schema_key_is_named_with_a_suggestion():
    document = {"state_shema": {"n": "int"}, "nodes": [{"name": "n", "run": "return {}"}]}
    problems = YAMLEngine().validate_dict(document)
    assert len(problems) == 1 and "did you mean 'state_schema'?" in problems[0]


def test_a_reducer_failing_at_the_fan_in_names_the_fan_in_node_and_the_branch():
    graph = two_branches({"mixed": lambda old, new: old + new}, lambda s: {"mixed": 1},
                         lambda s: {"mixed": "x"})
    with graph.compile(isolation="thread") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    exc = caught.value
    assert (exc.node, exc.branch, exc.error_type) == ("join", None, "ReducerError")
    assert "node 'join': combining the write of branch 'b': state key 'mixed': reducer" in str(exc)
    assert "TypeError" in str(exc) and "mixed" not in exc.state


def add_in_place(old: list, new: list) -> list:
    """A reducer that changes ``old`` (here: the start value) in place."""
    old.extend(new)
    return old


class InPlace(TypedDict):
    seen: Annotated[list, add_in_place]


def test_a_callable_reducer_that_changes_its_start_value_in_place_leaks_nothing():
    graph = StateGraph(InPlace)
    graph.add_node("a", lambda s: {"seen": [s["n"]]})
    graph.set_entry_point("a")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({"n": 1}) == {"n": 1, "seen": [1]}
        assert app.invoke({"n": 2}) == {"n": 2, "seen": [2]}   # not [1, 2]


def test_reducers_and_type_checks_apply_under_ainvoke_too():
    import asyncio

    graph = two_branches(Annotated_, lambda s: {"results": ["a"]}, lambda s: {"results": ["b"]})
    bad = two_branches({"n": int}, lambda s: {"n": 1}, lambda s: {"n": "two"})

    async def run() -> tuple[dict, BaseException | None]:
        with graph.compile(isolation="thread") as app, \
                bad.compile(isolation="thread", fail_fast=True) as broken:
            final = await app.ainvoke({"results": ["init"]})
            try:
                await broken.ainvoke({})
            except GraphExecutionError as exc:
                return final, exc
            return final, None

    final, error = asyncio.run(run())
    assert final == {"results": ["init", "a", "b"]}
    assert error is not None and error.error_type == "StateTypeError"
