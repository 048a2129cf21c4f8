"""``isobranch state``, ``isobranch history`` and ``isobranch fork``."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest

from isobranch.cli import EXIT_INVALID, EXIT_OK, main

WORKFLOW = """
    name: counter
    state_schema:
      n: int
      log: {type: list, reducer: append}
    nodes:
      - name: a
        run: |
          return {"n": state["n"] + 1, "log": "a"}
      - name: b
        run: |
          return {"n": state["n"] + 10, "log": "b"}
      - name: c
        run: |
          return {"n": state["n"] + 100, "log": "c"}
    edges:
      - {from: __start__, to: a}
      - {from: a, to: b}
      - {from: b, to: c}
"""


@pytest.fixture
def recorded(tmp_path: Path, capfd) -> Path:
    """A workflow whose run ``r`` (input ``n: 0``) is recorded in ``runs.db`` beside it."""
    path = tmp_path / "counter.yaml"
    path.write_text(textwrap.dedent(WORKFLOW))
    assert main(["run", str(path), "--input", '{"n": 0}', "--checkpoint",
                 str(tmp_path / "runs.db"), "--run-id", "r"]) == EXIT_OK
    capfd.readouterr()
    return path


def _run(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def test_history_prints_a_table_of_steps_and_with_json_each_state(recorded, capfd):
    database = str(recorded.parent / "runs.db")
    code, out, _ = _run(capfd, "history", database, "r")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["step", "recorded", "node"]
    assert [line.split()[0::3] for line in lines[1:]] == [
        ["0", "__start__"], ["1", "a"], ["2", "b"], ["3", "c"]]
    code, out, _ = _run(capfd, "history", database, "r", "--json")
    steps = [json.loads(line) for line in out.splitlines()]
    assert [(s["step"], s["node"], s["state"]["n"]) for s in steps] == [
        (0, "__start__", 0), (1, "a", 1), (2, "b", 11), (3, "c", 111)]


def test_state_prints_the_run_as_json_and_next_only_with_its_workflow(recorded, capfd):
    database = recorded.parent / "runs.db"
    with sqlite3.connect(database) as connection:  # as if killed after step a
        connection.execute("DELETE FROM steps WHERE seq > 1")
        connection.execute("UPDATE runs SET status = 'running'")
    code, out, _ = _run(capfd, "state", str(database), "r")
    assert code == EXIT_OK
    assert json.loads(out) == {"run_id": "r", "status": "running", "step": 1, "next": None,
                               "interrupts": [], "values": {"n": 1, "log": ["a"]}}
    code, out, _ = _run(capfd, "state", str(database), "r", "--workflow", str(recorded))
    assert json.loads(out)["next"] == ["b"]


def test_fork_records_a_new_run_that_resume_finishes(recorded, capfd):
    database = str(recorded.parent / "runs.db")
    code, out, err = _run(capfd, "fork", str(recorded), "r", "2", "--checkpoint", database,
                          "--update", '{"n": 1000, "log": "edit"}', "--run-id", "f")
    assert (code, out) == (EXIT_OK, "f\n")
    assert f"continue it with: isobranch resume {recorded} f --checkpoint {database}" in err
    code, out, _ = _run(capfd, "resume", str(recorded), "f", "--checkpoint", database)
    assert code == EXIT_OK
    assert json.loads(out) == {"n": 1100, "log": ["a", "b", "edit", "c"]}
    code, out, _ = _run(capfd, "state", database, "r")
    assert json.loads(out)["values"] == {"n": 111, "log": ["a", "b", "c"]}, "original unchanged"


@pytest.mark.parametrize(("argv", "message"), [
    (["fork", "{flow}", "r", "7", "--checkpoint", "{db}"],
     "step 7 is out of range: its steps are 0 (the input) to 3"),
    (["fork", "{flow}", "r", "1", "--checkpoint", "{db}", "--update", "{{n"],
     "--update '{{n': invalid JSON at line 1 column 2"),
    (["fork", "{flow}", "r", "1", "--checkpoint", "{db}", "--update", "[1]"],
     "--update: must be a JSON object, got list"),
    (["fork", "{flow}", "r", "1"], "fork needs --checkpoint DB"),
    (["fork", "{flow}", "r", "1", "--checkpoint", "{db}", "--run-id", "r"],
     "run 'r' already exists"),
    (["state", "{db}", "nope"], "run 'nope' in '{db}': there is no such run"),
    (["history", "{db}", "nope"], "run 'nope' in '{db}': there is no such run"),
    (["history", "{dir}/missing.db", "r"], "missing.db: no such checkpoint database"),
])
def test_bad_input_is_one_line_naming_what_is_wrong(recorded, capfd, argv, message):
    where = {"flow": str(recorded), "db": str(recorded.parent / "runs.db"),
             "dir": str(recorded.parent)}
    code, out, err = _run(capfd, *(arg.format(**where) for arg in argv))
    assert (code, out) == (EXIT_INVALID, "")
    assert message.format(**where) in err
    assert len(err.strip().splitlines()) == 1, err
