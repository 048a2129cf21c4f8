"""``pytest --isobranch-coverage``: the table, JSON equal under -n 0 and -n 2, fail-under.

Every test runs a real inner pytest session (in a subprocess, with a
user's plain environment).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("plain_os_environ")

ROOT = Path(__file__).resolve().parents[1]
STATS_AGENT = (ROOT / "tests" / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8")

# The stats agent's two verdicts come from its conditional edges; the
# suite below only ever takes `small`, and one case fails in a branch.
STATS_CASES = """
agent: ../agents/stats.yaml
# Without fail_fast, which branch a failure cancels never depends on timing,
# so every run of a case exercises the same nodes.
fail_fast: false
cases:
  - name: small
    input: {items: [1, 2]}
    expect: {verdict: "small: total 3"}
  - name: bad_items
    input: {items: "x"}
    expect_error: "branches failed: 'python_stats' (ValueError)"
"""
# A map whose branches route inside themselves (odd items to `odd`).
MAP_AGENT = """
name: parity
nodes:
  - name: split
    run: return None
  - name: check
    run: return None
  - name: odd
    run: |
      return {"odd": True}
  - name: even
    run: |
      -- lua
      return {even = true}
  - name: gather
    fan_in: true
    run: |
      return {"done": len(parallel_results)}
edges:
  - {from: __start__, to: split}
  - {from: split, to: check, type: map, over: numbers, as: n, fan_in: gather}
  - {from: check, to: odd, when: "state['n'] % 2 == 1"}
  - {from: check, to: even}
  - {from: odd, to: gather}
  - {from: even, to: gather}
"""
MAP_CASES = """
agent: ../agents/parity.yaml
isolation: process
cases:
  - name: odd_only
    input: {numbers: [1, 3]}
    expect: {done: 2}
  - name: both
    input: {numbers: [1, 2]}
    expect: {done: 2}
"""


def write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    write(pytester, "agents/stats.yaml", STATS_AGENT)
    write(pytester, "agents/parity.yaml", MAP_AGENT)
    write(pytester, "suite/test_stats.agent.yaml", STATS_CASES)
    write(pytester, "suite/test_parity.agent.yaml", MAP_CASES)
    return pytester


def test_the_session_ends_with_a_table_per_agent_naming_what_never_ran(
        suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                        "--isobranch-coverage")
    assert result.ret == 0, result.stdout.str()
    out = result.stdout.str()
    assert "isobranch graph coverage" in out
    table = out[out.index("isobranch graph coverage"):].splitlines()[1:]
    assert table[0].split() == ["agent", "nodes", "edges", "fan-outs", "subgraphs", "cover"]
    # parity: 5 nodes, 7 edges (START, map, 2 outcomes of check, 2 to gather, gather->END): all run.
    assert table[1].split() == ["agents/parity.yaml", "5/5", "7/7", "1/1", "0/0", "100.0%"]
    # stats: `big` never ran, nor its two edges.
    assert table[2].split() == ["agents/stats.yaml", "5/6", "7/9", "1/1", "0/0", "80.0%"]
    assert table[3].split() == ["total", "88.9%"]
    never = table[table.index("never run in agents/stats.yaml:") + 1:][:3]
    assert never == ["  node big",
                     "  edge combine -> big (when python: state['stats']['total'] >= "
                     "variables['threshold'])",
                     "  edge big -> __end__"]


def test_the_json_is_the_same_under_n0_and_n2(suite: pytest.Pytester) -> None:
    serial = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0",
                                        "--isobranch-coverage-json=serial.json")
    parallel = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                          "--isobranch-coverage-json=parallel.json")
    assert serial.ret == parallel.ret == 0
    first = json.loads((suite.path / "serial.json").read_text(encoding="utf-8"))
    second = json.loads((suite.path / "parallel.json").read_text(encoding="utf-8"))
    assert first == second
    assert first["version"] == 1
    assert [agent["agent"] for agent in first["agents"]] == ["agents/parity.yaml",
                                                              "agents/stats.yaml"]
    parity = first["agents"][0]
    assert parity["runs"] == 2
    # Node runs count cases: `odd` ran in both, `even` in one.
    assert {n["name"]: n["runs"] for n in parity["nodes"]["items"]} == {
        "split": 2, "check": 2, "odd": 2, "even": 1, "gather": 2}
    assert "coverage JSON written to" in parallel.stdout.str()


def test_fail_under_fails_the_session_with_a_clear_line(suite: pytest.Pytester) -> None:
    below = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                       "--isobranch-coverage-fail-under=89")
    assert below.ret == pytest.ExitCode.TESTS_FAILED
    below.stdout.fnmatch_lines([
        "FAIL: isobranch graph coverage 88.9% is below --isobranch-coverage-fail-under=89",
        "*4 passed*"])
    above = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                       "--isobranch-coverage-fail-under=88.9")
    assert above.ret == 0
    assert "FAIL: isobranch graph coverage" not in above.stdout.str()


def test_a_bad_fail_under_value_is_a_usage_error(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider",
                                        "--isobranch-coverage-fail-under=120")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "must be a percentage from 0 to 100, got '120'" in result.stderr.str()


def test_an_agent_that_cannot_be_loaded_is_named_not_counted(suite: pytest.Pytester) -> None:
    write(suite, "agents/broken.yaml", "name: broken\nnodes: [\n")
    write(suite, "suite/test_broken.agent.yaml", """
        agent: ../agents/broken.yaml
        cases:
          - name: any
            expect: {}
    """)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0",
                                        "--isobranch-coverage")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["not counted: agents/broken.yaml cannot be loaded: *"])
    assert "total" in result.stdout.str() and "88.9%" in result.stdout.str()


def test_a_json_path_that_cannot_be_written_fails_the_session_saying_why(
        suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0",
                                        "--isobranch-coverage-json=missing/dir/coverage.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "FAIL: cannot write --isobranch-coverage-json=missing/dir/coverage.json: *"
        "No such file or directory*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
