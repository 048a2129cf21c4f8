"""Nothing a node prints is lost, on any backend, whatever the environment's buffering.

Each test runs ``isobranch run`` in a plain environment (no
``PYTHONUNBUFFERED``: a user's shell, not a development machine), where a
worker process's ``sys.stdout`` is block-buffered. What branches print must
all reach the command's stderr, and its stdout must hold only the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import HAVE_DASK, plain_environment

ROOT = Path(__file__).parent.parent

NEEDS_DASK = pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed")

# settings.parallel of each way a branch can run: every backend, and the
# process backend's ways of starting and reusing workers.
RUNS_ON = {
    "inline": {"isolation": "inline"},
    "thread": {"isolation": "thread"},
    "process": {"isolation": "process"},
    "process-fresh-worker": {"isolation": "process", "fresh_worker_per_branch": True},
    "process-spawn": {"isolation": "process", "start_method": "spawn"},
    "dask": pytest.param({"isolation": "dask"}, marks=NEEDS_DASK),
}

# How a node writes: the text it writes in branch ``{branch}`` and the node body.
# Writes without a newline are the last to leave a buffer.
WRITES = {
    "print": ('print in branch {branch}', 'print("print in branch {branch}")\nreturn {{}}'),
    "sys.stdout.write": (
        "sys.stdout.write in branch {branch}",
        'import sys\nsys.stdout.write("sys.stdout.write in branch {branch}")\nreturn {{}}'),
    "sys.stderr.write": (
        "sys.stderr.write in branch {branch}",
        'import sys\nsys.stderr.write("sys.stderr.write in branch {branch}")\nreturn {{}}'),
    "lua print": ("lua print in branch {branch}",
                  '-- lua\nprint("lua print in branch {branch}")\nreturn {{}}'),
}
BRANCHES = ("a", "b")


def run_cli(flow: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """``isobranch run FLOW`` as a user's shell would run it."""
    return subprocess.run([sys.executable, "-m", "isobranch", "run", str(flow)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=plain_environment())


def fan_out_flow(tmp_path: Path, parallel: dict, branches: dict[str, str]) -> Path:
    """start -> each of ``branches`` (name: node body) in parallel -> join; its file."""
    document = {
        "settings": {"parallel": parallel},
        "nodes": [{"name": "start", "run": "return {}"},
                  *({"name": name, "run": body} for name, body in branches.items()),
                  {"name": "join", "fan_in": True,
                   "run": "return {'branches': len(parallel_results)}"}],
        "edges": [{"from": "__start__", "to": "start"},
                  *({"from": "start", "to": name, "type": "parallel", "fan_in": "join"}
                    for name in branches),
                  *({"from": name, "to": "join"} for name in branches)],
    }
    flow = tmp_path / "flow.yaml"
    flow.write_text(yaml.safe_dump(document, sort_keys=False))
    return flow


def test_the_plain_environment_has_no_pythonunbuffered(monkeypatch):
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    assert "PYTHONUNBUFFERED" not in plain_environment()
    assert plain_environment(EXTRA="x")["EXTRA"] == "x"


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("parallel", RUNS_ON.values(), ids=RUNS_ON.keys())
def test_what_a_branch_writes_reaches_stderr_and_stdout_is_only_the_json(
        parallel, write, tmp_path):
    text, body = WRITES[write]
    flow = fan_out_flow(tmp_path, parallel,
                        {f"writer_{b}": body.format(branch=b) for b in BRANCHES})
    done = run_cli(flow)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"branches": len(BRANCHES)}  # nothing else on stdout
    for branch in BRANCHES:
        line = text.format(branch=branch)
        assert line in done.stderr, f"{line!r} written by a node is lost: {done.stderr!r}"


# A branch that prints, then is stuck in a call until its timeout: the
# process backend's watchdog kills its worker, the Dask backend restarts it.
STUCK_AFTER_PRINTING = {
    "say": textwrap.dedent("""\
        import sys
        print("printed before the kill")
        sys.stdout.write("written before the kill\\n")
        sys.stderr.write("written to stderr before the kill\\n")
        return {}"""),
    "lua_say": '-- lua\nprint("lua printed before the kill")\nreturn {}',
    "stuck": "import time\ntime.sleep(120)\nreturn {}",
}
KILLED_LINES = ["printed before the kill", "written before the kill",
                "written to stderr before the kill", "lua printed before the kill"]


@pytest.mark.parametrize("parallel", [
    {"isolation": "process"},
    {"isolation": "process", "fresh_worker_per_branch": True},
    {"isolation": "process", "start_method": "spawn"},
    pytest.param({"isolation": "dask"}, marks=NEEDS_DASK),
], ids=["process", "process-fresh-worker", "process-spawn", "dask"])
def test_lines_a_branch_printed_before_its_worker_was_killed_reach_stderr(parallel, tmp_path):
    document = {
        "settings": {"parallel": {**parallel, "branch_timeout": 3}},
        "nodes": [{"name": "start", "run": "return {}"},
                  *({"name": name, "run": body} for name, body in STUCK_AFTER_PRINTING.items()),
                  {"name": "join", "fan_in": True,
                   "run": "return {'timed_out': [[r.branch, r.node] for r in parallel_results "
                          "if r.timed_out]}"}],
        "edges": [{"from": "__start__", "to": "start"},
                  {"from": "start", "to": "say", "type": "parallel", "fan_in": "join"},
                  {"from": "say", "to": "lua_say"},
                  {"from": "lua_say", "to": "stuck"},
                  {"from": "stuck", "to": "join"}],
    }
    flow = tmp_path / "flow.yaml"
    flow.write_text(yaml.safe_dump(document, sort_keys=False))
    done = run_cli(flow)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"timed_out": [["say", "stuck"]]}  # ended in its call
    for line in KILLED_LINES:
        assert line in done.stderr, f"{line!r} printed before the kill is lost: {done.stderr!r}"


@pytest.mark.parametrize("isolation", ["process", pytest.param("dask", marks=NEEDS_DASK)])
def test_what_a_branch_wrote_survives_a_later_kill_of_its_worker(isolation, tmp_path):
    """One worker runs both branches: the first writes text with no newline and
    ends; the second is stuck until its worker is killed (or restarted)."""
    flow = fan_out_flow(tmp_path, {"isolation": isolation, "max_workers": 1, "branch_timeout": 3},
                        {"writer": 'import sys\nsys.stdout.write("no newline, then a kill")\n'
                                   'return {}',
                         "stuck": "import time\ntime.sleep(120)\nreturn {}"})
    done = run_cli(flow)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"branches": 2}
    assert "no newline, then a kill" in done.stderr, done.stderr


FORK_SERVER_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from chatty import node  # writes "imported chatty" without a newline
from isobranch import END, START, StateGraph
graph = StateGraph()
graph.add_node("start", lambda state: None)
graph.add_fan_in_node("join", lambda state, results: {"n": len(results)})
for name in ("a", "b", "c"):
    graph.add_node(name, node)
    graph.add_parallel_edge("start", name, fan_in="join")
graph.add_edge(START, "start")
graph.add_edge("join", END)
with graph.compile(isolation="process", max_workers=3, fresh_worker_per_branch=True) as app:
    assert app.invoke({}) == {"n": 3}
"""


def test_output_buffered_in_the_fork_server_is_not_copied_into_its_workers(tmp_path):
    """The fork server imports the nodes' module when it loads the graph; text
    that module left in a buffer is written once, not once per forked worker."""
    (tmp_path / "chatty.py").write_text(
        'import sys\nsys.stdout.write("imported chatty")\n\n\ndef node(state):\n    return {}\n')
    done = subprocess.run([sys.executable, "-c", FORK_SERVER_SCRIPT, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=plain_environment())
    assert done.returncode == 0, done.stderr
    # Once by the caller, once by the fork server.
    assert done.stdout.count("imported chatty") == 2, done.stdout
