"""Stream modes: ``stream(mode="events" | "updates" | "values")``, ``astream``, ``--stream=MODE``.

``updates`` events must stay small whatever the state's size or the
fan-out's width; each mode's events are checked against what a person
computes by hand for a map with a failing item, a nested fan-out, and
node and branch retries.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import plain_environment
from isobranch import END, START, StateGraph, StreamMode, YAMLEngine
from isobranch.cli import main
from isobranch.errors import ConfigError

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "fan_out_demo.yaml"
ONE_KIB = 1024


def _body(state: dict) -> dict:
    if state["item"] == 2:
        raise ValueError("item 2 is bad")
    return {"v": state["item"] * 10}


def _join(state: dict, results: list) -> dict:
    return {"total": sum(r.state["v"] for r in results if r.success)}


def map_graph(isolation: str = "inline", **options):
    """start -> body per item of ``items`` (item 2 fails) -> join."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", _body)
    graph.add_fan_in_node("join", _join)
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation=isolation, **options)


def without_durations(events: list[dict]) -> list[dict]:
    """The events with their ``duration_ms`` (which no one can compute by hand) taken out."""
    return [{k: v for k, v in event.items() if k != "duration_ms"} for event in events]


def branch_event(branch: str, index: int | None, done: int, total: int, *, fan_out: str = "start",
                 fan_in: str = "join", success: bool = True, error_type: str | None = None,
                 attempts: int = 1) -> dict:
    return {"type": "branch", "fan_out": fan_out, "fan_in": fan_in, "branch": branch,
            "index": index, "success": success, "error_type": error_type, "timed_out": False,
            "attempts": attempts, "done": done, "total": total}


def test_updates_mode_of_a_map_with_a_failed_item_matches_the_hand_computed_events():
    with map_graph() as app:
        events = without_durations(list(app.stream({"items": [1, 2, 3]}, mode="updates")))
    assert events == [
        {"type": "node", "node": "start", "update": {}},
        branch_event("body[0]", 0, 1, 3),
        branch_event("body[1]", 1, 2, 3, success=False, error_type="ValueError"),
        branch_event("body[2]", 2, 3, 3),
        {"type": "parallel", "fan_out": "start", "fan_in": "join", "total": 3, "succeeded": 2,
         "failed": 1, "failed_branches": ["body[1]"]},
        {"type": "node", "node": "join", "update": {"total": 40}},
        {"type": "final"},
    ]


def test_values_mode_is_one_event_per_main_path_step_with_the_whole_state_then_final():
    with map_graph() as app:
        events = list(app.stream({"items": [1, 2, 3]}, mode=StreamMode.VALUES))
    assert events == [
        {"type": "node", "node": "start", "state": {"items": [1, 2, 3]}},
        {"type": "node", "node": "join", "state": {"items": [1, 2, 3], "total": 40}},
        {"type": "final", "state": {"items": [1, 2, 3], "total": 40}},
    ]


def test_events_mode_is_the_default_and_unchanged():
    with map_graph() as app:
        default = list(app.stream({"items": [1, 3]}))
        named = list(app.stream({"items": [1, 3]}, mode="events"))
    for events in (default, named):
        assert [e["type"] for e in events] == ["node", "branch", "branch", "parallel", "node",
                                               "final"]
        assert events[0]["state"] == {"items": [1, 3]}
        assert [r.state["v"] for r in events[3]["branches"]] == [10, 30]
        assert events[-1]["state"] == {"items": [1, 3], "total": 40}


def test_a_parallel_event_of_updates_mode_names_at_most_ten_failed_branches():
    with map_graph() as app:
        events = list(app.stream({"items": [2] * 25 + [1]}, mode="updates"))
    (parallel,) = [e for e in events if e["type"] == "parallel"]
    assert parallel["total"] == 26 and parallel["failed"] == 25 and parallel["succeeded"] == 1
    assert parallel["failed_branches"] == [f"body[{i}]" for i in range(10)]


def _outer(state: dict) -> dict:
    return {"seen": state["item"]}


def nested_graph():
    """A map of ``items`` whose branches fan out again (a, b -> inner_join) before join."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("outer", _outer)
    graph.add_node("a", lambda state: {"a": state["seen"] + 1})
    graph.add_node("b", lambda state: {"b": state["seen"] + 2})
    graph.add_fan_in_node("inner_join", lambda state, results: {
        "inner": sorted(r.state.get("a", 0) + r.state.get("b", 0) for r in results)})
    graph.add_fan_in_node("join", lambda state, results: {
        "all": [r.state["inner"] for r in results]})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "outer", over="items", fan_in="join")
    graph.add_parallel_edge("outer", "a", fan_in="inner_join")
    graph.add_parallel_edge("outer", "b", fan_in="inner_join")
    graph.add_edge("a", "inner_join")
    graph.add_edge("b", "inner_join")
    graph.add_edge("inner_join", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation="inline")


def test_a_nested_fan_out_reports_only_the_main_path_fan_out_in_every_mode():
    with nested_graph() as app:
        updates = without_durations(list(app.stream({"items": [10, 20]}, mode="updates")))
        values = list(app.stream({"items": [10, 20]}, mode="values"))
    assert updates == [
        {"type": "node", "node": "start", "update": {}},
        branch_event("outer[0]", 0, 1, 2, fan_out="start"),
        branch_event("outer[1]", 1, 2, 2, fan_out="start"),
        {"type": "parallel", "fan_out": "start", "fan_in": "join", "total": 2, "succeeded": 2,
         "failed": 0, "failed_branches": []},
        {"type": "node", "node": "join", "update": {"all": [[11, 12], [21, 22]]}},
        {"type": "final"},
    ]
    assert [e["type"] for e in values] == ["node", "node", "final"]
    assert values[-1]["state"] == {"items": [10, 20], "all": [[11, 12], [21, 22]]}


def retry_graph():
    """A main-path node and a map branch that each fail once, then succeed."""
    failures = {"check": 1, "body[1]": 1}

    def check(state: dict) -> dict:
        if failures["check"]:
            failures["check"] -= 1
            raise ConnectionError("flaky")
        return {"checked": True}

    def body(state: dict) -> dict:
        name = f"body[{state['index']}]"
        if failures.get(name):
            failures[name] -= 1
            raise ConnectionError("flaky branch")
        return {"v": state["item"]}

    graph = StateGraph()
    graph.add_node("check", check, retry={"max_attempts": 2, "initial_interval": 0.001,
                                          "jitter": False})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: {
        "total": sum(r.state["v"] for r in results)})
    graph.add_edge(START, "check")
    graph.add_map_edge("check", "body", over="items", fan_in="join",
                       retry={"max_attempts": 2, "initial_interval": 0.001, "jitter": False,
                              "retry_on": ("ConnectionError",)})
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation="inline")


def test_retries_in_updates_mode_report_each_failed_attempt_then_the_outcome():
    with retry_graph() as app:
        events = without_durations(list(app.stream({"items": [5, 6]}, mode="updates")))
    kinds = [(e["type"], e.get("node") or e.get("branch")) for e in events]
    assert kinds == [("node_retry", "check"), ("node", "check"), ("branch", "body[0]"),
                     ("branch_retry", "body[1]"), ("branch", "body[1]"), ("parallel", None),
                     ("node", "join"), ("final", None)]
    assert events[1] == {"type": "node", "node": "check", "update": {"checked": True}}
    assert events[4] == branch_event("body[1]", 1, 2, 2, fan_out="check", attempts=2)
    assert events[6] == {"type": "node", "node": "join", "update": {"total": 11}}


def test_values_mode_leaves_out_retry_events():
    with retry_graph() as app:
        events = list(app.stream({"items": [5, 6]}, mode="values"))
    assert [(e["type"], e.get("node")) for e in events] == [
        ("node", "check"), ("node", "join"), ("final", None)]
    assert events[-1]["state"] == {"items": [5, 6], "checked": True, "total": 11}


def test_a_failed_run_in_updates_mode_raises_after_its_small_events():
    graph = StateGraph()
    graph.add_node("start", lambda state: {"n": 1})
    graph.add_node("boom", lambda state: 1 / 0)
    graph.add_edge(START, "start")
    graph.add_edge("start", "boom")
    graph.add_edge("boom", END)
    seen = []
    with graph.compile(isolation="inline") as app, pytest.raises(Exception, match="boom"):
        for event in app.stream({}, mode="updates"):
            seen.append(event)
    assert seen == [{"type": "node", "node": "start", "update": {"n": 1}}]


@pytest.mark.parametrize("mode", ["event", "UPDATES", "", None])
def test_an_unknown_mode_is_a_config_error_naming_it_and_the_modes(mode):
    with map_graph() as app:
        with pytest.raises(ConfigError) as raised:
            app.stream({"items": [1]}, mode=mode)
        assert isinstance(raised.value, ValueError)
        message = str(raised.value)
        assert repr(mode) in message and "events, updates, values" in message
        with pytest.raises(ConfigError):
            app.astream({"items": [1]}, mode=mode)


def test_astream_takes_the_mode():
    async def collect() -> list[dict]:
        with map_graph() as app:
            return [event async for event in app.astream({"items": [1, 3]}, mode="updates")]

    events = asyncio.run(collect())
    assert events[-1] == {"type": "final"}
    assert events[-2] == {"type": "node", "node": "join", "update": {"total": 40}}


# -- size: updates events do not grow with the state or with the width ----------------------

def _sized_body(state: dict) -> dict:
    return {"v": state["item"] + 1}


def sized_graph(isolation: str):
    """A map over ``items`` in a state that also holds ``payload`` (any size)."""
    graph = StateGraph()
    graph.add_node("start", lambda state: {"started": True})
    graph.add_node("body", _sized_body)
    graph.add_fan_in_node("join", lambda state, results: {"count": len(results)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation=isolation, max_workers=2)


@pytest.mark.parametrize("isolation", ["inline", "thread", "process"])
def test_no_updates_event_grows_with_the_state_or_the_width(isolation):
    examples = 12 if isolation != "process" else 5
    with sized_graph(isolation) as app:

        @settings(max_examples=examples, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(width=st.integers(0, 300), size=st.integers(0, 3000))
        def check(width: int, size: int) -> None:
            state = {"items": list(range(width)),
                     "payload": [{"id": i, "text": f"document {i}"} for i in range(size)]}
            events = list(app.stream(state, mode="updates"))
            biggest = max(len(json.dumps(event)) for event in events)
            assert biggest <= ONE_KIB, (width, size, biggest)
            assert sum(e["type"] == "branch" for e in events) == width
            assert events[-1] == {"type": "final"}

        check()
        # The same run in events mode does grow: the bound above is a real one.
        state = {"items": list(range(50)), "payload": ["x" * 100] * 50}
        node = next(e for e in app.stream(state) if e["type"] == "node")
        assert len(json.dumps(node["state"])) > ONE_KIB


# -- the command ------------------------------------------------------------------------------

def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isobranch", *args], capture_output=True,
                          text=True, timeout=120, env=plain_environment(), cwd=ROOT)


def test_the_command_streams_updates_and_values(tmp_path):
    updates = _run_cli("run", str(DEMO), "--input", '{"items": [4, 8]}', "--isolation",
                       "inline", "--stream=updates")
    assert updates.returncode == 0, updates.stderr
    lines = [json.loads(line) for line in updates.stdout.splitlines()]
    assert [line["type"] for line in lines][-2:] == ["node", "final"]
    assert lines[-1] == {"type": "final"}
    assert all("state" not in line for line in lines)
    (parallel,) = [line for line in lines if line["type"] == "parallel"]
    assert parallel["total"] == 2 and "branches" not in parallel

    values = _run_cli("run", str(DEMO), "--input", '{"items": [4, 8]}', "--isolation",
                      "inline", "--stream=values")
    assert values.returncode == 0, values.stderr
    lines = [json.loads(line) for line in values.stdout.splitlines()]
    assert {line["type"] for line in lines} == {"node", "final"}
    assert all("state" in line for line in lines)
    with YAMLEngine(isolation="inline").load_from_file(DEMO) as app:
        assert lines[-1]["state"] == app.invoke({"items": [4, 8]})


def test_a_bare_stream_option_still_means_events_wherever_it_stands():
    before_file = _run_cli("run", "--stream", str(DEMO), "--input", '{"items": [1]}',
                           "--isolation", "inline")
    assert before_file.returncode == 0, before_file.stderr
    lines = [json.loads(line) for line in before_file.stdout.splitlines()]
    assert "branches" in next(line for line in lines if line["type"] == "parallel")


def test_an_unknown_stream_mode_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", str(DEMO), "--stream=everything"])
    assert exited.value.code == 2
    assert "everything" in capsys.readouterr().err


def test_the_command_warns_of_failed_branches_in_updates_mode(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text("""
name: warn
nodes:
  - name: start
    run: |
      return None
  - name: body
    run: |
      if state["item"] == 2:
          raise ValueError("bad")
      return {"v": state["item"]}
  - name: join
    fan_in: true
    run: |
      return {"n": len(parallel_results)}
edges:
  - {from: __start__, to: start}
  - {from: start, to: body, type: map, over: items, fan_in: join}
  - {from: body, to: join}
  - {from: join, to: __end__}
""")
    completed = _run_cli("run", str(flow), "--input", '{"items": [1, 2]}', "--isolation",
                         "inline", "--stream=updates")
    assert completed.returncode == 0, completed.stderr
    assert "isobranch: warning: branch 'body[1]' failed (ValueError)" in completed.stderr
