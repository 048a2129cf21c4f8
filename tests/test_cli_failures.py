"""A failed branch is never silent: warning lines on stderr, and fan-in errors that name it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch import END, START, GraphExecutionError, StateGraph
from isobranch.branch import ParallelFlowResult
from isobranch.cli import main
from isobranch.cli_failures import MESSAGE_CHARS, FailedBranchWarnings

# A map over ``items`` whose branch divides by its item: item 0 fails with
# ZeroDivisionError. The fan-in node reads ``inverse`` with ``{read}``.
MAP = """
    name: invert
    settings:
      parallel: {{isolation: {isolation}}}
    nodes:
      - name: split
        run: |
          return {{"items": state.get("items", [1, 0, 2, 0])}}
      - name: invert
        run: |
          return {{"inverse": 1 / state["item"]}}
      - name: join
        fan_in: true
        run: |
          return {{"inverses": [{read} for r in parallel_results]}}
    edges:
      - {{from: __start__, to: split}}
      - {{from: split, to: invert, type: map, over: items, fan_in: join}}
      - {{from: invert, to: join}}
"""
TOLERANT = 'r.state.get("inverse")'
STRICT = 'r.state["inverse"]'


def write_map(tmp_path: Path, read: str = TOLERANT, isolation: str = "inline",
              name: str = "invert.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(MAP.format(read=read, isolation=isolation)))
    return path


def warning(index: int) -> str:
    return (f"isobranch: warning: branch 'invert[{index}]' failed (ZeroDivisionError): node "
            f"'invert' in branch 'invert[{index}]' failed: ZeroDivisionError: division by zero "
            f"(at invert.yaml:11)")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Runs name their file relative to tmp_path, so errors read ``(at invert.yaml:11)``."""
    monkeypatch.chdir(tmp_path)



def test_a_failed_branch_is_a_warning_line_even_when_the_run_succeeds(tmp_path):
    path = write_map(tmp_path)
    done = subprocess.run([sys.executable, "-m", "isobranch", "run", path.name],
                          capture_output=True, text=True, timeout=120, env=plain_environment(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [warning(1), warning(3)]
    assert json.loads(done.stdout)["inverses"] == [1.0, None, 0.5, None]


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_warnings_come_from_every_backend_and_with_stream(tmp_path, capfd, isolation):
    path = write_map(tmp_path, isolation=isolation)
    assert main(["run", path.name, "--stream"]) == 0
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [warning(1), warning(3)]
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events[-1]["type"] == "final", "stdout keeps only the JSON lines"


def test_more_than_ten_failed_branches_are_counted(tmp_path, capfd):
    path = write_map(tmp_path)
    items = json.dumps({"items": [0] * 25 + [4]})
    assert main(["run", path.name, "--input", items]) == 0
    lines = capfd.readouterr().err.splitlines()
    assert lines[:10] == [warning(index) for index in range(10)]
    assert lines[10:] == ["isobranch: warning: 15 more failed branches not shown (25 in all; "
                          "--stream lists every branch's result)"]


def test_the_cap_counts_across_the_fan_outs_of_a_run():
    out = _Lines()
    warnings = FailedBranchWarnings(out, shown=3)
    for fan_out in range(2):  # two fan-outs of two failures each
        warnings.update({"type": "parallel", "fan_in": "join", "branches": [
            ParallelFlowResult(branch=f"b{fan_out}{i}", success=False, error="boom",
                               error_type="RuntimeError") for i in range(2)]})
    warnings.close()
    assert out.lines == [
        "isobranch: warning: branch 'b00' failed (RuntimeError): boom",
        "isobranch: warning: branch 'b01' failed (RuntimeError): boom",
        "isobranch: warning: branch 'b10' failed (RuntimeError): boom",
        "isobranch: warning: 1 more failed branch not shown (4 in all; --stream lists every "
        "branch's result)"]


def test_a_warning_stays_one_line_however_long_the_error():
    out = _Lines()
    warnings = FailedBranchWarnings(out)
    error = "first line\n" + "x" * (3 * MESSAGE_CHARS)
    warnings.update({"type": "parallel", "fan_in": "join", "branches": [
        ParallelFlowResult(branch="b", success=False, error=error, error_type="LuaRuntimeError"),
        ParallelFlowResult(branch="ok")]})
    warnings.close()
    [line] = out.lines
    assert line.startswith("isobranch: warning: branch 'b' failed (LuaRuntimeError): first line x")
    assert line.endswith("...") and "\n" not in line
    assert len(line) == len("isobranch: warning: branch 'b' failed (LuaRuntimeError): ") \
        + MESSAGE_CHARS


def test_a_fan_in_that_fails_after_branches_failed_names_them_on_the_command_line(tmp_path,
                                                                                    capfd):
    path = write_map(tmp_path, read=STRICT)
    assert main(["run", path.name]) == 1
    assert capfd.readouterr().err.splitlines() == [
        warning(1), warning(3),
        "isobranch: error: node 'join' failed: KeyError: 'inverse' (at invert.yaml:15); it ran "
        "after 2 of 4 "
        "branches failed: 'invert[1]' (ZeroDivisionError), 'invert[3]' (ZeroDivisionError)"]


def test_debug_shows_the_tracebacks_of_the_branches_a_fan_in_failed_after(tmp_path, capfd):
    path = write_map(tmp_path, read=STRICT)
    assert main(["run", path.name, "--debug"]) == 1
    err = capfd.readouterr().err
    assert "traceback of branch 'invert[1]'" in err and "traceback of branch 'invert[3]'" in err
    assert err.count("ZeroDivisionError: division by zero\n") >= 2


def _invert_graph(items: list[int], fan_in_retry: int | None = None) -> StateGraph:
    graph = StateGraph()
    graph.add_node("split", lambda state: {"items": items})
    graph.add_node("invert", lambda state: {"inverse": 1 / state["item"]})
    graph.add_fan_in_node("join", lambda state, results: {
        "inverses": [r.state["inverse"] for r in results]}, retry=fan_in_retry)
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "invert", over="items", fan_in="join")
    graph.add_edge("invert", "join")
    graph.add_edge("join", END)
    return graph


@pytest.mark.parametrize("fan_in_retry", [None, 2])
def test_the_library_error_of_such_a_fan_in_names_the_failed_branches(fan_in_retry):
    with _invert_graph([0] * 12 + [1], fan_in_retry).compile(isolation="inline") as app, \
            pytest.raises(GraphExecutionError) as info:
        app.invoke({})
    names = ", ".join(f"'invert[{i}]' (ZeroDivisionError)" for i in range(10))
    assert str(info.value).endswith(
        f"KeyError: 'inverse'; it ran after 12 of 13 branches failed: {names} and 2 more")
    assert info.value.node == "join" and info.value.error_type == "KeyError"
    assert [r.success for r in info.value.results] == [False] * 12 + [True]


def test_a_fan_in_that_fails_with_no_failed_branch_is_left_as_it_was():
    graph = StateGraph()
    graph.add_node("split", lambda state: {"items": [1, 2]})
    graph.add_node("invert", lambda state: {"inverse": 1 / state["item"]})
    graph.add_fan_in_node("join", lambda state, results: {"x": state["missing"]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "invert", over="items", fan_in="join")
    graph.add_edge("invert", "join")
    with graph.compile(isolation="inline") as app, \
            pytest.raises(GraphExecutionError) as info:
        app.invoke({})
    assert str(info.value) == "node 'join' failed: KeyError: 'missing'"
    assert info.value.results is None


def test_a_nested_fan_in_names_its_failed_branches_in_the_outer_branch_result(tmp_path, capfd):
    """A fan-out inside a branch: its fan-in's error names the inner failed branches, and
    the outer branch that failed because of it gets the warning line, naming them too."""
    graph = StateGraph()
    graph.add_node("outer", lambda state: {})
    graph.add_node("split", lambda state: {"items": [1, 0]})
    graph.add_node("invert", lambda state: {"inverse": 1 / state["item"]})
    graph.add_fan_in_node("inner_join", lambda state, results: {
        "inverses": [r.state["inverse"] for r in results]})
    graph.add_fan_in_node("outer_join", lambda state, results: {
        "ok": [r.success for r in results]})
    graph.add_edge(START, "outer")
    graph.add_parallel_edge("outer", "split", fan_in="outer_join")
    graph.add_map_edge("split", "invert", over="items", fan_in="inner_join")
    graph.add_edge("invert", "inner_join")
    graph.add_edge("inner_join", "outer_join")
    graph.add_edge("outer_join", END)
    with graph.compile(isolation="thread") as app:
        events = list(app.stream({}))
    [parallel] = [event for event in events if event["type"] == "parallel"]
    [outer] = parallel["branches"]
    assert not outer.success
    assert outer.error == ("node 'inner_join' in branch 'split' failed: KeyError: 'inverse'; it "
                           "ran after 1 of 2 branches failed: 'invert[1]' (ZeroDivisionError)")
    out = _Lines()
    FailedBranchWarnings(out).update(parallel)
    assert out.lines == [f"isobranch: warning: branch 'split' failed (KeyError): {outer.error}"]


class _Lines:
    """A text stream that keeps the lines written to it."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()


RECORDED = """
    settings:
      checkpoint: {path: runs.db}
      parallel: {isolation: inline}
    nodes:
      - name: split
        run: |
          return {"items": [0, 1, 2]}
      - name: work
        run: |
          import pathlib
          if (pathlib.Path(state["dir"]) / f"fail-{state['item']}").exists():
              raise RuntimeError(f"item {state['item']} fails")
          return {"done": state["item"]}
      - name: join
        fan_in: true
        run: |
          return {"done": [r.state["done"] for r in parallel_results]}
    edges:
      - {from: __start__, to: split}
      - {from: split, to: work, type: map, over: items, fan_in: join}
      - {from: work, to: join}
"""


def test_resume_warns_about_the_branches_that_fail_in_what_it_runs(tmp_path, capfd):
    path = tmp_path / "recorded.yaml"
    path.write_text(textwrap.dedent(RECORDED))
    (tmp_path / "fail-1").touch()
    state = json.dumps({"dir": str(tmp_path)})
    line = ("isobranch: warning: branch 'work[1]' failed (RuntimeError): node 'work' in branch "
            "'work[1]' failed: RuntimeError: item 1 fails (at recorded.yaml:13, line 3 of its "
            "code)")
    error = ("isobranch: error: node 'join' failed: KeyError: 'done' (at recorded.yaml:18); it "
             "ran after 1 of 3 "
             "branches failed: 'work[1]' (RuntimeError)")
    assert main(["run", path.name, "--run-id", "r1", "--input", state]) == 1
    assert capfd.readouterr().err.splitlines()[1:] == [line, error]
    assert main(["resume", path.name, "r1"]) == 1  # work[1] runs again, and fails again
    assert capfd.readouterr().err.splitlines() == [line, error]
    (tmp_path / "fail-1").unlink()
    assert main(["resume", path.name, "r1"]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and json.loads(captured.out)["done"] == [0, 1, 2]
