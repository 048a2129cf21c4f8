"""Checkpoints from YAML settings, YAMLEngine(checkpointer=...) and the command line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch import GraphError, SqliteCheckpointer, YAMLEngine
from isobranch.checkpoint import RunStatus
from isobranch.cli import main

WORKFLOW = """
    name: demo
    settings:
      checkpoint: {path: runs.db}
      parallel: {isolation: inline, fail_fast: true}
    nodes:
      - name: split
        run: |
          return {"docs": list(range(6))}
      - name: score
        run: |
          import pathlib
          marks = pathlib.Path(state["marks"])
          (marks / f"{state['doc']}.{len(list(marks.iterdir()))}").touch()
          if (marks.parent / f"fail-{state['doc']}").exists():
              raise RuntimeError(f"doc {state['doc']} fails")
          return {"score": state["doc"] * 2}
      - name: collect
        fan_in: true
        run: |
          return {"scores": [r.state["score"] for r in parallel_results]}
    edges:
      - {from: __start__, to: split}
      - {from: split, to: score, type: map, over: docs, as: doc, fan_in: collect}
      - {from: score, to: collect}
"""


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    (tmp_path / "marks").mkdir()
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(WORKFLOW))
    return path


def state_for(workflow: Path) -> str:
    return json.dumps({"marks": str(workflow.parent / "marks")})


def test_settings_checkpoint_path_is_relative_to_the_yaml_file(workflow, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)
    with YAMLEngine().load_from_file(workflow) as app:
        assert app.checkpointer.path == workflow.parent / "runs.db"
        app.invoke(json.loads(state_for(workflow)), config={"run_id": "r"})
    assert SqliteCheckpointer(workflow.parent / "runs.db").get_run("r").status \
        is RunStatus.SUCCEEDED


def test_the_engine_checkpointer_wins_over_the_settings(workflow, tmp_path):
    mine = SqliteCheckpointer(tmp_path / "mine.db")
    with YAMLEngine(checkpointer=mine).load_from_file(workflow) as app:
        assert app.checkpointer is mine
    assert not (tmp_path / "runs.db").exists()
    with pytest.raises(GraphError, match="must be a SqliteCheckpointer"):
        YAMLEngine(checkpointer="runs.db")


@pytest.mark.parametrize(("checkpoint", "message"), [
    ({"paht": "runs.db"}, "settings.checkpoint.paht: unknown key .*did you mean 'path'"),
    ({}, "settings.checkpoint: needs 'path'"),
    ({"path": 3}, "settings.checkpoint.path: must be a file path"),
    ({"path": "r.db", "pickle": "yes"}, "settings.checkpoint.pickle: must be true or false"),
    ("runs.db", "settings.checkpoint: must be a mapping"),
])
def test_bad_checkpoint_settings_are_named(checkpoint, message, tmp_path):
    document = {"settings": {"checkpoint": checkpoint},
                "nodes": [{"name": "a", "language": "lua", "run": "return {}"}]}
    with pytest.raises(GraphError, match=message):
        YAMLEngine().load_from_dict(document, base_dir=tmp_path)


def test_a_relative_path_needs_a_base_directory():
    document = {"settings": {"checkpoint": {"path": "runs.db"}},
                "nodes": [{"name": "a", "language": "lua", "run": "return {}"}]}
    with pytest.raises(GraphError, match="needs load_from_file or base_dir"):
        YAMLEngine().load_from_dict(document)


def test_a_lua_only_document_keeps_its_database_inside_its_directory(tmp_path):
    def document(checkpoint):
        return {"settings": {"checkpoint": checkpoint},
                "nodes": [{"name": "a", "language": "lua", "run": "return {}"}]}

    engine = YAMLEngine(allow_python=False)
    for path in ("../outside.db", str(tmp_path / "abs.db")):
        with pytest.raises(GraphError, match=r"settings\.checkpoint\.path"):
            engine.load_from_dict(document({"path": path}), base_dir=tmp_path)
    with pytest.raises(GraphError, match="cannot turn on pickle"):
        engine.load_from_dict(document({"path": "r.db", "pickle": True}), base_dir=tmp_path)
    with engine.load_from_dict(document({"path": "r.db"}), base_dir=tmp_path) as app:
        assert app.checkpointer.path == tmp_path / "r.db"


def test_validating_a_workflow_creates_no_database(workflow):
    assert main(["validate", str(workflow)]) == 0
    assert not (workflow.parent / "runs.db").exists()


def test_cli_run_then_resume_after_a_failure(workflow, capfd):
    (workflow.parent / "fail-3").touch()
    database = workflow.parent / "cli.db"
    code = main(["run", str(workflow), "--checkpoint", str(database), "--run-id", "n1",
                 "--input", state_for(workflow)])
    captured = capfd.readouterr()
    assert code == 1 and "doc 3 fails" in captured.err
    assert "isobranch: run n1 (recorded in" in captured.err
    assert main(["run", str(workflow), "--checkpoint", str(database), "--run-id", "n1",
                 "--input", state_for(workflow)]) == 2
    assert "run 'n1' already exists" in capfd.readouterr().err
    (workflow.parent / "fail-3").unlink()
    assert main(["resume", str(workflow), "n1", "--checkpoint", str(database)]) == 0
    assert json.loads(capfd.readouterr().out)["scores"] == [0, 2, 4, 6, 8, 10]
    ran = sorted(int(p.name.split(".")[0]) for p in (workflow.parent / "marks").iterdir())
    assert ran == [0, 1, 2, 3, 3, 4, 5], "only the failed item and those after it ran again"
    assert not (workflow.parent / "runs.db").exists(), "--checkpoint overrides the settings"


def test_cli_resume_streams_and_refuses_what_it_cannot_resume(workflow, capfd, tmp_path):
    assert main(["run", str(workflow), "--run-id", "n2", "--input", state_for(workflow)]) == 0
    capfd.readouterr()
    assert main(["resume", str(workflow), "n2", "--stream"]) == 0
    events = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [e["type"] for e in events] == ["run", "final"]
    assert main(["resume", str(workflow), "missing"]) == 2
    assert "there is no such run" in capfd.readouterr().err
    assert main(["resume", str(workflow), "n2", "--checkpoint", str(tmp_path / "no.db")]) == 2
    assert "no such checkpoint database" in capfd.readouterr().err
    assert not (tmp_path / "no.db").exists()


def test_cli_resume_of_a_changed_workflow_says_what_changed(workflow, capfd):
    (workflow.parent / "fail-0").touch()
    assert main(["run", str(workflow), "--run-id", "n3", "--input", state_for(workflow)]) == 1
    (workflow.parent / "fail-0").unlink()
    workflow.write_text(workflow.read_text().replace("state[\"doc\"] * 2", "state[\"doc\"] * 3"))
    capfd.readouterr()
    assert main(["resume", str(workflow), "n3"]) == 2
    assert "node 'score' changed" in capfd.readouterr().err
    assert main(["resume", str(workflow), "n3", "--force"]) == 0
    assert json.loads(capfd.readouterr().out)["scores"] == [0, 3, 6, 9, 12, 15]


def test_cli_runs_lists_a_table(workflow, capfd):
    assert main(["run", str(workflow), "--run-id", "good", "--input", state_for(workflow)]) == 0
    (workflow.parent / "fail-1").touch()
    assert main(["run", str(workflow), "--run-id", "bad", "--input", state_for(workflow)]) == 1
    capfd.readouterr()
    assert main(["runs", str(workflow.parent / "runs.db")]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "graph", "status", "started", "duration", "branches"]
    good, bad = (line.split() for line in lines[1:])
    assert good[:3] == ["good", "demo", "succeeded"] and good[-1] == "6/6"
    assert bad[:3] == ["bad", "demo", "failed"] and bad[-1] == "1/6"
    assert main(["runs", str(workflow.parent / "none.db")]) == 2


def test_cli_run_id_without_a_checkpointer_is_invalid_input(tmp_path, capfd):
    path = tmp_path / "plain.yaml"
    path.write_text("nodes:\n  - {name: a, language: lua, run: 'return {}'}\n")
    assert main(["run", str(path), "--run-id", "x"]) == 2
    assert "run_id needs a checkpointer" in capfd.readouterr().err


def test_ctrl_c_of_the_command_records_interrupted_and_resume_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    started = tmp_path / "started"
    flow = tmp_path / "slow.yaml"
    flow.write_text(textwrap.dedent(f"""
        settings:
          checkpoint: {{path: runs.db}}
        nodes:
          - name: first
            run: |
              return {{"a": 1}}
          - name: wait
            run: |
              import pathlib, time
              marker = pathlib.Path({str(started)!r})
              if not marker.exists():
                  marker.touch()
                  time.sleep(60)
              return {{"b": state["a"] + 1}}
    """))
    child = subprocess.Popen([sys.executable, "-m", "isobranch", "run", str(flow), "--run-id",
                              "c1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env=plain_environment())
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130, err
    assert SqliteCheckpointer(tmp_path / "runs.db").get_run("c1").status \
        is RunStatus.INTERRUPTED
    done = subprocess.run([sys.executable, "-m", "isobranch", "resume", str(flow), "c1"],
                          capture_output=True, text=True, timeout=60, env=plain_environment())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"a": 1, "b": 2}
