"""The ``isobranch`` command line: output, exit codes, error lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch.cli import main

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "fan_out_demo.yaml"


@pytest.fixture
def flow(tmp_path):
    def write(text: str, name: str = "flow.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path
    return write


def test_run_prints_final_state_as_json(capfd):
    assert main(["run", str(DEMO), "--input", '{"items": [4, 8, 15]}']) == 0
    final = json.loads(capfd.readouterr().out)
    assert final["markers"] == ["lua", "python"]
    assert final["total"] == 27 and final["largest"] == 15
    assert final["verdict"] == "big: total 27 >= 10"


def test_run_input_from_file_and_isolation_override(capfd, tmp_path):
    data = tmp_path / "in.json"
    data.write_text('{"items": [1, 2]}')
    assert main(["run", str(DEMO), "--input", f"@{data}", "--isolation", "inline"]) == 0
    assert json.loads(capfd.readouterr().out)["verdict"] == "small: total 3 < 10"


def test_stream_prints_one_json_event_per_line(capfd):
    assert main(["run", str(DEMO), "--stream", "--input", '{"items": [1]}']) == 0
    lines = capfd.readouterr().out.strip().splitlines()
    events = [json.loads(line) for line in lines]
    branch_events = [e for e in events if e["type"] == "branch"]
    assert sorted(e["branch"] for e in branch_events) == ["lua_stats", "python_stats"]
    assert [e["type"] for e in events[1:3]] == ["branch", "branch"]
    events = [e for e in events if e["type"] != "branch"]
    assert [e["type"] for e in events] == ["node", "parallel", "node", "node", "final"]
    assert [e.get("node") for e in events] == ["start", None, "combine", "small", None]
    assert [b["branch"] for b in events[1]["branches"]] == ["lua_stats", "python_stats"]


def test_failed_run_exits_1_with_one_line_naming_the_node(capfd, flow):
    path = flow("""
        nodes:
          - {name: ok, run: "return {}"}
          - {name: broken, run: "-- lua\\nreturn nil + 1"}
    """)
    assert main(["run", str(path)]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "broken" in err and "Traceback" not in err


def test_debug_shows_the_traceback(capfd, flow):
    path = flow("nodes:\n  - {name: broken, run: 'raise ValueError(1)'}\n")
    assert main(["run", str(path), "--debug"]) == 1
    assert "Traceback" in capfd.readouterr().err


@pytest.mark.parametrize(("args", "names"), [
    (["run", "{missing}"], ["{missing}: cannot read"]),
    (["run", "{demo}", "--input", "{{not json"], ["--input: invalid JSON at line 1 column 2"]),
    (["run", "{demo}", "--input", "[1, 2]"], ["--input: must be a JSON object, got list"]),
    (["run", "{demo}", "--input", "@{missing}"], ["--input file '{missing}': cannot read"]),
    (["run", "{demo}", "--isolation", "quantum"], ["{demo}: ", "unknown isolation backend 'quantum'"]),
    (["validate", "{bad}"], ["{bad}: node 'a': invalid Python"]),
])
def test_invalid_input_exits_2_with_one_line(args, names, capfd, flow, tmp_path):
    bad = flow("nodes:\n  - {name: a, run: 'return {'}\n", "bad.yaml")
    values = {"missing": tmp_path / "missing.yaml", "demo": DEMO, "bad": bad}
    assert main([a.format(**values) for a in args]) == 2
    captured = capfd.readouterr()
    (line,) = captured.err.splitlines()  # exactly one line, naming what is at fault
    for name in names:
        assert name.format(**values) in line
    assert captured.out == ""


def test_validate_reports_every_problem_with_location(capfd, flow):
    path = flow("""
        nodes:
          - {name: a, run: "return {"}
          - {name: b, run: "pass"}
        edges:
          - {from: a, to: ghost}
          - {from: b, to: a, type: parallel}
    """)
    assert main(["validate", str(path)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(path)) for line in lines)
    assert any("ghost" in line for line in lines) and any("fan_in" in line for line in lines)


def test_validate_ok(capfd):
    assert main(["validate", str(DEMO)]) == 0
    assert "ok" in capfd.readouterr().out


def test_yaml_syntax_error_names_line(capfd, flow):
    path = flow("nodes:\n  - name: a\n   run: x\n")
    assert main(["run", str(path)]) == 2
    assert f"{path}:3:" in capfd.readouterr().err


def test_graph_prints_mermaid(capfd):
    assert main(["graph", str(DEMO)]) == 0
    out = capfd.readouterr().out
    assert out.startswith("flowchart TD") and "parallel, fan-in combine" in out


def test_graph_draws_what_was_compiled_including_implied_links(capfd, flow):
    # No __start__ edge (the first node is the entry) and a fallback edge.
    path = flow("""
        nodes:
          - {name: check, run: "return {}"}
          - {name: high, run: "return {}"}
          - {name: low, run: "-- lua\\nreturn {}"}
        edges:
          - {from: check, to: low}
          - {from: check, to: high, when: {lua: "state.n > 5"}}
    """)
    assert main(["graph", str(path)]) == 0
    # high and low have no edges: the runner ends the run there, so END is drawn.
    assert capfd.readouterr().out.splitlines() == [
        "flowchart TD",
        '    n___start__["__start__"] --> n_check["check"]',
        '    n_check["check"] -->|"lua: state.n #62; 5"| n_high["high"]',
        '    n_check["check"] --> n_low["low"]',
        '    n_high["high"] --> n___end__["__end__"]',
        '    n_low["low"] --> n___end__["__end__"]',
    ]


def test_console_script_entry_point_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "isobranch.cli", "run", str(DEMO), "--input", '{"items": [20]}'],
        capture_output=True, text=True, timeout=60, env=plain_environment())
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["verdict"].startswith("big")


def test_internal_error_is_one_line(capfd, monkeypatch):
    def broken(self, path):
        raise RuntimeError("engine bug\nwith a second line")

    monkeypatch.setattr("isobranch.cli.YAMLEngine.load_from_file", broken)
    assert main(["run", str(DEMO)]) == 1
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [
        "isobranch: internal error (RuntimeError): engine bug with a second line"]
    assert captured.out == ""


def test_interrupt_is_one_line_and_restores_stdout(capfd, monkeypatch):
    def interrupted(self, path):
        print("printed by a node")
        raise KeyboardInterrupt

    stdout_before = sys.stdout
    monkeypatch.setattr("isobranch.cli.YAMLEngine.load_from_file", interrupted)
    assert main(["run", str(DEMO)]) == 130
    assert sys.stdout is stdout_before
    print("the caller's own output")
    captured = capfd.readouterr()
    assert captured.err.splitlines() == ["printed by a node", "isobranch: interrupted"]
    assert captured.out == "the caller's own output\n"


# reST and Markdown markup that has no place in terminal text.
MARKUP = re.compile(r"``|`|:(?:class|func|meth|attr|mod|exc|data|obj|ref|doc):|\.\. \w+::")


@pytest.mark.parametrize("command", [[], ["run"], ["resume"], ["runs"], ["validate"], ["graph"],
                                     ["state"], ["history"], ["fork"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: isobranch")
    assert not MARKUP.findall(text), text


def test_every_subcommand_is_checked_for_plain_help(capsys):
    """The list above must not miss a subcommand added later."""
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1).split(",")
    assert sorted(listed) == ["fork", "graph", "history", "resume", "run", "runs", "state",
                              "validate"]
