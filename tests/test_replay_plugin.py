"""``pytest --isobranch-record`` and replayed cases, through real pytest runs under -n 2.

The agent's recorded node raises unless ``LIVE_OK`` is set, so a replayed
run that passes without it proves the node never ran.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("plain_os_environ")

AGENT = """\
name: asker
nodes:
  - name: split
    run: return None
  - name: call
    replay: true
    run: |
      import os
      if os.environ.get("LIVE_OK") != "1":
          raise RuntimeError("the live model was called")
      return {"answer": "live:" + state["question"]}
  - name: join
    fan_in: true
    run: |
      return {"answers": [r.state["answer"] for r in parallel_results]}
  - name: summary
    replay: true
    run: |
      import os
      if os.environ.get("LIVE_OK") != "1":
          raise RuntimeError("the live model was called")
      return {"summary": " + ".join(state["answers"])}
edges:
  - {from: split, to: call, type: map, over: questions, as: question, fan_in: join}
  - {from: call, to: join}
  - {from: join, to: summary}
"""
MANY = """\
agent: asker.yaml
cases:
  - name: three
    input: {questions: [a, b, c]}
    expect: {summary: "live:a + live:b + live:c"}
  - name: one
    input: {questions: [z]}
    expect: {answers: ["live:z"]}
"""
OTHER = """\
agent: asker.yaml
cases:
  - name: two
    input: {questions: [x, y]}
    expect: {summary: "live:x + live:y"}
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    for name, text in [("asker.yaml", AGENT), ("test_many.agent.yaml", MANY),
                       ("test_other.agent.yaml", OTHER)]:
        (pytester.path / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return pytester


def _record(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.setenv("LIVE_OK", "1")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                        "--isobranch-record", *args)
    monkeypatch.delenv("LIVE_OK")
    return result


def test_record_then_replay_offline_under_xdist(suite, monkeypatch):
    recorded = _record(suite, monkeypatch)
    assert recorded.ret == 0, recorded.stdout.str()
    recorded.stdout.fnmatch_lines_random(["recorded test_many.agent.cassette.json: 2 cases",
                                          "recorded test_other.agent.cassette.json: 1 case"])
    cassette = json.loads((suite.path / "test_many.agent.cassette.json").read_text())
    assert cassette["cases"]["three"] == {
        "call[0]": [{"answer": "live:a"}], "call[1]": [{"answer": "live:b"}],
        "call[2]": [{"answer": "live:c"}], "summary": [{"summary": "live:a + live:b + live:c"}]}
    assert not [p.name for p in suite.path.iterdir() if p.name.endswith(".tmp")]
    for isolation in ("thread", "process"):
        replayed = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                              f"--isobranch-isolation={isolation}")
        assert replayed.ret == 0, replayed.stdout.str()
        replayed.stdout.fnmatch_lines(["*3 passed*"])


def test_a_case_without_its_recording_fails_naming_the_node_and_the_flag(suite, monkeypatch):
    assert _record(suite, monkeypatch, "test_many.agent.yaml").ret == 0
    with (suite.path / "test_many.agent.yaml").open("a", encoding="utf-8") as file:
        file.write("  - name: new\n    input: {questions: [q]}\n    expect: {}\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rf")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str()
    result.stdout.fnmatch_lines_random(["*2 failed, 2 passed*"])
    assert "node 'call' in branch 'call[0]'" in output
    assert "no recording of its call 1" in output
    assert "pytest --isobranch-record test_many.agent.yaml" in output
    assert "the live model was called" not in output


def test_recording_one_case_keeps_the_others(suite, monkeypatch):
    assert _record(suite, monkeypatch).ret == 0
    path = suite.path / "test_many.agent.cassette.json"
    before = json.loads(path.read_text())["cases"]
    assert _record(suite, monkeypatch, "test_many.agent.yaml::one").ret == 0
    assert json.loads(path.read_text())["cases"] == before


def test_an_agent_without_recorded_nodes_writes_no_cassette(pytester: pytest.Pytester,
                                                            monkeypatch):
    root = Path(__file__).resolve().parents[1]
    (pytester.path / "stats.yaml").write_text(
        (root / "tests" / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8"))
    (pytester.path / "test_stats.agent.yaml").write_text(
        "agent: stats.yaml\ncases:\n  - name: one\n    input: {items: [1]}\n    expect: {}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isobranch-record")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["no case ran a 'replay: true' node"])
    assert not list(pytester.path.glob("*.cassette.json"))
