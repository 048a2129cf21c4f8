"""The ``isobranch`` command as a separate process: what reaches stdout and stderr.

Each test runs the console script the way a shell would and reads its real
file descriptors, so output written below Python (Lua's C-level ``print``,
worker processes) is seen too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import BACKENDS, HAVE_DASK, live_processes, plain_environment

ROOT = Path(__file__).parent.parent
ISOBRANCH = [sys.executable, "-m", "isobranch"]

NOISY = """
nodes:
  - name: start
    run: |
      print("python on the main path")
      return {"items": [1, 2]}
  - name: lua_branch
    run: |
      -- lua
      print("lua in a branch")
      return {x = 1}
  - name: python_branch
    run: |
      import sys
      print("python in a branch")
      sys.__stdout__.write("python to the original sys.stdout\\n")
      return {"y": 2}
  - name: join
    fan_in: true
    run: |
      print("python in the fan-in")
      return {"n": len(parallel_results)}
  - name: finish
    run: |
      -- lua
      print("lua on the main path")
      return {done = true}
edges:
  - {from: __start__, to: start}
  - {from: start, to: lua_branch, type: parallel, fan_in: join}
  - {from: start, to: python_branch, type: parallel, fan_in: join}
  - {from: lua_branch, to: join}
  - {from: python_branch, to: join}
  - {from: join, to: finish}
"""
PRINTED = ["python on the main path", "lua in a branch", "python in a branch",
           "python to the original sys.stdout", "python in the fan-in", "lua on the main path"]

# One branch stuck in a Python call, one in a Lua loop: nothing ends by itself.
LONG = """
settings:
  lua: {timeout: 300}
  parallel: {branch_timeout: 300, max_workers: 2}
nodes:
  - name: start
    run: |
      import os, pathlib
      if os.environ["ISOBRANCH_TEST_MOMENT"] == "starting":  # the backend starts next
          pathlib.Path(os.environ["ISOBRANCH_TEST_MARKER"]).write_text("started")
      return {}
  - name: sleeper
    run: |
      import os, pathlib, time
      if os.environ["ISOBRANCH_TEST_MOMENT"] == "running":
          pathlib.Path(os.environ["ISOBRANCH_TEST_MARKER"]).write_text("started")
      time.sleep(300)
      return {}
  - name: spinner
    run: |
      -- lua
      while true do end
  - name: join
    fan_in: true
    run: return {}
edges:
  - {from: __start__, to: start}
  - {from: start, to: sleeper, type: parallel, fan_in: join}
  - {from: start, to: spinner, type: parallel, fan_in: join}
  - {from: sleeper, to: join}
  - {from: spinner, to: join}
"""


def write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(*args: str, timeout: float = 120, **options) -> subprocess.CompletedProcess:
    """The command as a user's shell runs it: a plain environment unless ``env=`` is given."""
    options.setdefault("env", plain_environment())
    return subprocess.run([*ISOBRANCH, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **options)


def worker_children(pid: int) -> list[int]:
    """Children of ``pid`` that are backend workers (fork server, Dask's spawned workers)."""
    found = []
    for child, fields in live_processes():
        if int(fields[1]) != pid:
            continue
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if b"spawn_main" in command or b"isolation.process.child" in command:
            found.append(child)
    return found


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    return [pid for pid, fields in live_processes() if int(fields[2]) == pgid]


@pytest.mark.parametrize("isolation", BACKENDS)
def test_stdout_is_only_the_final_json_whatever_nodes_print(isolation, tmp_path):
    flow = write(tmp_path, NOISY)
    completed = run_cli("run", str(flow), "--isolation", isolation)
    assert completed.returncode == 0, completed.stderr
    final = json.loads(completed.stdout)  # nothing else on stdout
    assert final["n"] == 2 and final["done"] is True
    for line in PRINTED:
        assert line in completed.stderr, f"{line!r} printed by a node is lost"


@pytest.mark.parametrize("isolation", BACKENDS)
def test_stream_stdout_is_only_json_lines(isolation, tmp_path):
    flow = write(tmp_path, NOISY)
    completed = run_cli("run", str(flow), "--isolation", isolation, "--stream")
    assert completed.returncode == 0, completed.stderr
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [e["type"] for e in events] == ["node", "branch", "branch", "parallel", "node", "node",
                                          "final"]
    assert all(line in completed.stderr for line in PRINTED)


def test_stream_ends_with_an_error_event_when_the_run_fails(tmp_path):
    flow = write(tmp_path, """
        settings: {parallel: {fail_fast: true}}
        nodes:
          - {name: start, run: "return {}"}
          - {name: good, run: "return {'g': 1}"}
          - {name: bad, run: "raise ValueError('no luck')"}
          - {name: join, fan_in: true, run: "return {}"}
        edges:
          - {from: __start__, to: start}
          - {from: start, to: good, type: parallel, fan_in: join}
          - {from: start, to: bad, type: parallel, fan_in: join}
          - {from: good, to: join}
          - {from: bad, to: join}
    """)
    completed = run_cli("run", str(flow), "--stream", "--isolation", "thread")
    assert completed.returncode == 1
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    error = events[-1]
    assert set(error) == {"type", "node", "branch", "error_type", "message"}
    assert error["type"] == "error" and error["branch"] == "bad" and error["node"] == "bad"
    assert error["error_type"] == "ValueError" and "no luck" in error["message"]
    assert len(completed.stderr.splitlines()) == 1


def test_stream_error_event_on_the_main_path_has_no_branch(tmp_path):
    flow = write(tmp_path, """
        nodes:
          - {name: ok, run: "return {'a': 1}"}
          - {name: broken, run: "-- lua\\nreturn nil + 1"}
    """)
    completed = run_cli("run", str(flow), "--stream")
    assert completed.returncode == 1
    events = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [e["type"] for e in events] == ["node", "error"]
    assert events[-1]["node"] == "broken" and events[-1]["branch"] is None


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    completed = run_cli("--version")
    assert completed.returncode == 0
    assert completed.stdout.strip() == f"isobranch {version('isobranch')}"


@pytest.mark.parametrize("args", [
    ["run"],                                    # missing argument
    ["run", "x.yaml", "--no-such-option"],
    ["frobnicate"],
    ["run", "{missing}"],
    ["run", "{flow}", "--input", "{{not json"],
    ["run", "{flow}", "--isolation", "quantum"],
])
def test_every_usage_error_is_one_line_on_stderr(args, tmp_path):
    flow = write(tmp_path, "nodes:\n  - {name: a, run: 'return {}'}\n")
    values = {"missing": tmp_path / "missing.yaml", "flow": flow}
    completed = run_cli(*[a.format(**values) for a in args])
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert len(completed.stderr.splitlines()) == 1, completed.stderr


def test_a_closed_stdout_is_one_line_and_exit_141(tmp_path):
    flow = write(tmp_path, NOISY)
    reader, writer = os.pipe()
    os.close(reader)  # like `| head` that has already exited
    try:
        completed = subprocess.run([*ISOBRANCH, "run", str(flow), "--stream"], stdout=writer,
                                   stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT,
                                   env=plain_environment())
    finally:
        os.close(writer)
    assert completed.returncode == 141
    lines = [line for line in completed.stderr.splitlines() if line not in PRINTED]
    assert len(lines) == 1 and "standard output was closed" in lines[0], completed.stderr


@pytest.mark.parametrize("moment", ["starting", "running"])
@pytest.mark.parametrize("isolation", BACKENDS)
def test_ctrl_c_exits_130_with_one_line_and_leaves_no_process(isolation, moment, tmp_path):
    """Ctrl-C while the backend starts its workers, or while branches run."""
    flow = write(tmp_path, LONG)
    marker = tmp_path / "started"
    env = plain_environment(ISOBRANCH_TEST_MARKER=str(marker), ISOBRANCH_TEST_MOMENT=moment)
    # A session of its own: SIGINT goes to the whole group, as a terminal's Ctrl-C does.
    process = subprocess.Popen([*ISOBRANCH, "run", str(flow), "--isolation", isolation],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        # Starting: as soon as the first worker process exists (it is still
        # importing). Running: once a branch has begun.
        while not marker.exists() or (moment == "starting" and isolation in ("process", "dask")
                                      and not worker_children(process.pid)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the workflow never reached that moment"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130
    assert err.splitlines() == ["isobranch: interrupted"], err
    assert out == ""
    deadline = time.monotonic() + 15  # workers notice their parent is gone
    while process_group(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_group(process.pid) == [], "processes outlived the interrupted command"


@pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed")
def test_a_script_without_main_guard_on_dask_fails_in_a_few_lines_saying_what_to_do(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        from isobranch import StateGraph

        graph = StateGraph()
        graph.add_node("start", lambda state: None)
        graph.add_node("a", lambda state: {"a": 1})
        graph.add_node("b", lambda state: {"b": 1})
        graph.add_fan_in_node("join", lambda state, results: {"n": len(results)})
        graph.add_parallel_edge("start", "a", fan_in="join")
        graph.add_parallel_edge("start", "b", fan_in="join")
        graph.set_entry_point("start")
        with graph.compile(isolation="dask", max_workers=2) as compiled:
            print(compiled.invoke({}))
    """))
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=120, cwd=tmp_path, env=plain_environment())
    assert completed.returncode == 1
    assert 'guard its entry point with `if __name__ == "__main__":`' in completed.stderr
    # The script's own traceback only: the workers that re-ran it said nothing.
    assert completed.stderr.count("Traceback") <= 2, completed.stderr
    assert len(completed.stderr.splitlines()) <= 40, completed.stderr


@pytest.mark.parametrize(("source", "guarded"), [
    ("main()\n", False),
    ("if __name__ == '__main__':\n    main()\n", True),
    ("if '__main__' == __name__:\n    main()\n", True),
    ("def f():\n    if __name__ == '__main__':\n        main()\n", False),  # not top level
    ("if __name__ != '__main__':\n    main()\n", False),
])
def test_the_main_guard_hint_is_given_only_to_a_script_without_one(source, guarded, tmp_path):
    from isobranch.isolation.dask_cluster import _has_main_guard

    script = tmp_path / "script.py"
    script.write_text(source)
    assert _has_main_guard(str(script)) is guarded
