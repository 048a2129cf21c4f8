"""Checkpoints from YAML settings, YAMLEngine(checkpointer=...) and the command line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch import GraphError, GraphExecutionError, SqliteCheckpointer, YAMLEngine
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
    assert capfd.readouterr().err == (f"isobranch: error: {path}: --run-id needs --checkpoint DB "
                                      f"(the workflow has no settings.checkpoint)\n")


def _slow_workflow(tmp_path: Path, *, sleep: int) -> tuple[Path, Path]:
    """A checkpointed workflow whose second node touches ``started`` then sleeps ``sleep``
    seconds the first time it runs (a resume finds the marker and goes on at once)."""
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
                  time.sleep({sleep})
              return {{"b": state["a"] + 1}}
    """))
    return started, flow


def test_ctrl_c_of_the_command_records_interrupted_and_resume_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    started, flow = _slow_workflow(tmp_path, sleep=60)
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


def test_a_run_id_that_exists_says_what_to_type_and_nothing_else(workflow, capfd):
    database = workflow.parent / "cli.db"
    args = ["run", str(workflow), "--checkpoint", str(database), "--run-id", "n1",
            "--input", state_for(workflow)]
    assert main(args) == 0
    capfd.readouterr()
    assert main(args) == 2
    captured = capfd.readouterr()
    assert captured.err.splitlines() == [
        f"isobranch: error: run 'n1' already exists in {database}; resume it (isobranch resume "
        f"{workflow} n1 --checkpoint {database}), delete it (isobranch runs {database} "
        f"--delete n1) or choose another --run-id"]
    assert captured.out == ""
    assert main(["run", str(workflow), "--checkpoint", str(database), "--run-id", "n1",
                 "--input", state_for(workflow), "--stream"]) == 2
    [error] = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert error["type"] == "error" and "--delete n1" in error["message"]
    assert "resume('n1')" not in error["message"]


def test_a_run_id_that_exists_in_the_settings_database(workflow, capfd, monkeypatch):
    monkeypatch.chdir(workflow.parent)
    args = ["run", "flow.yaml", "--run-id", "a b", "--input", state_for(workflow)]
    assert main(args) == 0
    assert capfd.readouterr().err == (f"isobranch: run a b (recorded in "
                                      f"{workflow.parent / 'runs.db'})\n")
    assert main(args) == 2
    database = workflow.parent / "runs.db"
    assert capfd.readouterr().err == (
        f"isobranch: error: run 'a b' already exists in {database}; resume it (isobranch resume "
        f"flow.yaml 'a b'), delete it (isobranch runs {database} --delete 'a b') or choose "
        f"another --run-id\n")
    # The commands it names do what it says.
    assert main(["runs", str(database), "--delete", "a b"]) == 0
    assert capfd.readouterr().out == "deleted run a b\n"
    assert main(args) == 0


def test_the_library_keeps_its_own_words(workflow):
    from isobranch.checkpoint import GraphChangedError, RunExistsError

    checkpointer = SqliteCheckpointer(workflow.parent / "lib.db")
    with YAMLEngine(checkpointer=checkpointer).load_from_file(workflow) as app:
        (workflow.parent / "fail-0").touch()
        with pytest.raises(GraphExecutionError):
            app.invoke(json.loads(state_for(workflow)), config={"run_id": "r"})
        with pytest.raises(RunExistsError, match=r"resume it with resume\('r'\), delete it "
                                                 r"with delete_run\('r'\)") as exists:
            app.invoke(json.loads(state_for(workflow)), config={"run_id": "r"})
    assert (exists.value.run_id, exists.value.path) == ("r", checkpointer.path)
    workflow.write_text(workflow.read_text().replace('state["doc"] * 2', 'state["doc"] * 3'))
    with YAMLEngine(checkpointer=checkpointer).load_from_file(workflow) as app, \
            pytest.raises(GraphChangedError, match="resume with force=True") as changed:
        app.resume("r")
    assert changed.value.changes == ["node 'score' changed"]
    checkpointer.close()


def test_a_changed_workflow_says_force_in_the_command_s_words(workflow, capfd):
    (workflow.parent / "fail-0").touch()
    assert main(["run", str(workflow), "--run-id", "n4", "--input", state_for(workflow)]) == 1
    workflow.write_text(workflow.read_text().replace('state["doc"] * 2', 'state["doc"] * 3'))
    capfd.readouterr()
    assert main(["resume", str(workflow), "n4"]) == 2
    assert capfd.readouterr().err == (
        f"isobranch: error: run 'n4' in {workflow.parent / 'runs.db'}: the workflow changed "
        f"since the run started (node 'score' changed); add --force to resume it with the "
        f"changed workflow anyway\n")


def test_runs_delete_forgets_a_run_and_refuses_an_unknown_one(workflow, capfd):
    database = workflow.parent / "runs.db"
    for run_id in ("keep", "drop"):
        assert main(["run", str(workflow), "--run-id", run_id, "--input",
                     state_for(workflow)]) == 0
    capfd.readouterr()
    assert main(["runs", str(database), "--delete", "drop"]) == 0
    assert capfd.readouterr().out == "deleted run drop\n"
    assert [run.run_id for run in SqliteCheckpointer(database).list_runs()] == ["keep"]
    assert main(["runs", str(database), "--delete", "drop"]) == 2
    assert capfd.readouterr().err == f"isobranch: error: {database}: there is no run 'drop'\n"
    assert main(["runs", str(workflow.parent / "none.db"), "--delete", "x"]) == 2
    assert not (workflow.parent / "none.db").exists()


def test_a_run_deleted_while_it_runs_fails_and_leaves_nothing(workflow, capfd):
    """Its next record finds no run: the run fails, and no row of it is left for a new run
    of the same id to take for its own."""
    database = workflow.parent / "runs.db"
    checkpointer = SqliteCheckpointer(database)
    with YAMLEngine(checkpointer=checkpointer).load_from_file(workflow) as app:
        events = app.stream(json.loads(state_for(workflow)), config={"run_id": "gone"})
        assert next(events)["type"] == "run"
        assert checkpointer.delete_run("gone")
        with pytest.raises(GraphExecutionError, match="recording the step of node 'split' "
                           "failed: run 'gone' is no longer in the database: it was deleted "
                           "while it ran"):
            list(events)
    for table in ("runs", "steps", "fan_outs", "branches"):
        assert checkpointer._read(f"SELECT COUNT(*) FROM {table}") == [(0,)], table
    checkpointer.close()


# -- working time ---------------------------------------------------------------


class _Clock:
    """The store's wall clock, set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    import isobranch.checkpoint.store as store

    fake = _Clock()
    monkeypatch.setattr(store, "_clock", fake)
    return fake


def test_working_time_leaves_out_the_time_between_a_kill_and_the_resume(tmp_path, clock):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    store.create_run("k", "g", "fp", "{}")
    clock.now = 1003.0
    store.write_step("k", 1, "a", "node", 1, "{}")
    clock.now = 1004.5
    store.write_fan_out("k", 1, "a", 2)
    clock.now = 1006.0
    store.write_branches([("k", 1, 0, True, "{}", False)])
    # Killed here (nothing recorded after 1006), resumed an hour later.
    run = store.get_run("k")
    assert run.status is RunStatus.RUNNING and run.duration is None
    assert run.working_time == pytest.approx(6.0), "so far: up to the last record"
    clock.now = 4600.0
    store.reopen_run("k", None)
    clock.now = 4602.0
    store.write_branches([("k", 1, 1, True, "{}", False)])
    clock.now = 4605.0
    store.finish_run("k", RunStatus.SUCCEEDED, "{}", None)
    run = store.get_run("k")
    assert run.working_time == pytest.approx(6.0 + 5.0)
    assert run.duration == pytest.approx(11.0)
    assert run.finished_at - run.started_at == pytest.approx(3605.0)
    store.close()


def test_working_time_of_a_run_interrupted_then_resumed(tmp_path, clock):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    store.create_run("i", "g", "fp", "{}")
    clock.now = 1010.0
    store.finish_run("i", RunStatus.INTERRUPTED, None, "KeyboardInterrupt: ")
    clock.now = 2000.0  # the interrupted run recorded its end: its span counts whole
    assert store.get_run("i").working_time == pytest.approx(10.0)
    store.reopen_run("i", None)
    clock.now = 2002.5
    store.finish_run("i", RunStatus.FAILED, None, "RuntimeError: x")
    clock.now = 3000.0
    store.reopen_run("i", None)
    clock.now = 3001.0
    store.finish_run("i", RunStatus.SUCCEEDED, "{}", None)
    assert store.get_run("i").duration == pytest.approx(10.0 + 2.5 + 1.0)
    store.close()


def test_the_runs_table_shows_working_time(tmp_path, clock, capfd):
    store = SqliteCheckpointer(tmp_path / "runs.db")
    store.create_run("k", "g", "fp", "{}")
    clock.now = 1002.0
    store.write_step("k", 1, "a", "node", 1, "{}")
    clock.now = 8000.0
    store.reopen_run("k", None)
    clock.now = 8001.5
    store.finish_run("k", RunStatus.SUCCEEDED, "{}", None)
    store.close()
    assert main(["runs", str(tmp_path / "runs.db")]) == 0
    [_, row] = capfd.readouterr().out.splitlines()
    assert row.split()[5] == "3.5s"


def test_a_version_1_database_gets_working_time(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, graph TEXT, fingerprint TEXT NOT NULL, input TEXT NOT NULL,
            status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, final_state TEXT,
            error TEXT);
        CREATE TABLE steps (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL, kind TEXT NOT NULL,
            steps INTEGER NOT NULL, state TEXT NOT NULL, recorded_at REAL NOT NULL,
            PRIMARY KEY (run_id, seq));
        INSERT INTO runs VALUES ('done', 'g', 'fp', '{}', 'succeeded', 100.0, 104.0, '{}', NULL);
        INSERT INTO runs VALUES ('killed', 'g', 'fp', '{}', 'running', 200.0, NULL, NULL, NULL);
        INSERT INTO steps VALUES ('killed', 1, 'a', 'node', 1, '{}', 207.0);
    """)
    connection.commit()
    connection.close()
    store = SqliteCheckpointer(path)
    done, killed = store.list_runs()
    assert (done.run_id, done.working_time, done.duration) == ("done", 4.0, 4.0)
    assert (killed.run_id, killed.working_time, killed.duration) == ("killed", 7.0, None)
    assert store._read("SELECT value FROM meta WHERE key = 'schema'") == [("3",)]
    store.reopen_run("killed", None)  # a resume of the killed run counts its 7 s
    store.finish_run("killed", RunStatus.SUCCEEDED, "{}", None)
    assert store.get_run("killed").working_time >= 7.0
    store.close()


def test_a_sigkill_then_a_resume_counts_only_the_time_the_run_ran(tmp_path):
    """The real thing: the command killed with SIGKILL mid-run, resumed later."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import wait_until

    started, flow = _slow_workflow(tmp_path, sleep=120)
    child = subprocess.Popen([sys.executable, "-m", "isobranch", "run", str(flow), "--run-id",
                              "k1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert wait_until(lambda: started.exists() or child.poll() is not None), "no start"
        assert child.poll() is None, child.stderr.read()
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        killed_at = time.time()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        child.stderr.close()
    database = tmp_path / "runs.db"
    assert SqliteCheckpointer(database).get_run("k1").status is RunStatus.RUNNING
    resumed_at = time.time()
    done = subprocess.run([sys.executable, "-m", "isobranch", "resume", str(flow), "k1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    run = SqliteCheckpointer(database).get_run("k1")
    assert run.status is RunStatus.SUCCEEDED
    # What the working time leaves out: from the last record before the kill
    # (before the node that was killed started) to the resume reopening the
    # run, which contains [killed_at, resumed_at].
    left_out = (run.finished_at - run.started_at) - run.working_time
    assert left_out >= resumed_at - killed_at > 0
    assert 0 < run.working_time == run.duration
