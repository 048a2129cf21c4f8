"""A Python node stuck in one call on the thread backend never keeps the process alive.

The stuck call runs on a daemon thread: the CLI exits with its normal code
right after printing, a script's interpreter exits when its main thread
ends, and Ctrl-C exits at once. Each case runs in a subprocess with a
bounded wait, so a process that would hang fails the test instead.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import blocked_in_threading, frames_of, plain_environment, wait_until
from isobranch import StateGraph
from isobranch.isolation.thread_pool import DaemonThreadPool

ROOT = Path(__file__).parent.parent
# Far below the hour the stuck node sleeps, far above a loaded machine's start-up.
EXIT_WITHIN_SECONDS = 60

STUCK_FLOW = """\
settings:
  parallel: {isolation: thread, branch_timeout: 0.5}
nodes:
  - name: start
    run: return {}
  - name: stuck
    run: |
      import time
      time.sleep(3600)
  - name: quick
    run: |
      return {"quick": True}
  - name: join
    fan_in: true
    run: |
      return {"timed_out": [r.branch for r in parallel_results if r.timed_out],
              "ok": [r.branch for r in parallel_results if r.success]}
edges:
  - {from: start, to: stuck, type: parallel, fan_in: join}
  - {from: start, to: quick, type: parallel, fan_in: join}
"""


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=EXIT_WITHIN_SECONDS, env=plain_environment())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process did not exit within {EXIT_WITHIN_SECONDS}s after its work: "
                    f"stdout={exc.stdout!r}")


def test_cli_exits_with_its_normal_code_after_a_branch_stuck_in_a_call(tmp_path):
    flow = tmp_path / "stuck.yaml"
    flow.write_text(STUCK_FLOW)
    done = _run(["-m", "isobranch", "run", str(flow)], tmp_path)
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout)
    assert final["timed_out"] == ["stuck"] and final["ok"] == ["quick"]


SCRIPT = """\
import time
from isobranch import StateGraph

def stuck(state):
    time.sleep(3600)

graph = StateGraph()
graph.add_node("start", lambda state: {})
graph.add_node("stuck", stuck)
graph.add_node("quick", lambda state: {"quick": True})
graph.add_fan_in_node("join", lambda state, results: {
    "timed_out": [r.branch for r in results if r.timed_out]})
graph.set_entry_point("start")
graph.add_parallel_edge("start", "stuck", fan_in="join")
graph.add_parallel_edge("start", "quick", fan_in="join")
app = graph.compile(isolation="thread", branch_timeout=0.3)
print(app.invoke({})["timed_out"])
{close}
"""


@pytest.mark.parametrize("close", ["app.close()", "# left to interpreter exit"])
def test_a_script_exits_when_its_main_thread_ends_despite_a_stuck_branch(tmp_path, close):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace("{close}", close))
    done = _run([str(script)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['stuck']"
    # Nothing at exit (no traceback of a dying thread); the one line is the
    # warning the library logs when it abandons the stuck thread, which
    # Python prints on stderr when the script configured no logging.
    assert done.stderr.splitlines() == [
        "thread backend: branch 'stuck' is past its 0.3s branch_timeout in node 'stuck' and "
        "did not stop; its thread is abandoned and runs on until the call returns"]


def test_ctrl_c_exits_at_once_with_130_while_a_branch_is_stuck(tmp_path):
    marker = tmp_path / "entered"
    flow = tmp_path / "stuck.yaml"
    flow.write_text(textwrap.dedent(f"""\
        settings:
          parallel: {{isolation: thread}}
        nodes:
          - name: start
            run: return {{}}
          - name: stuck
            run: |
              import time
              open({str(marker)!r}, "w").close()
              time.sleep(3600)
          - name: join
            fan_in: true
            run: return {{}}
        edges:
          - {{from: start, to: stuck, type: parallel, fan_in: join}}
        """))
    process = subprocess.Popen([sys.executable, "-m", "isobranch", "run", str(flow)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, env=plain_environment())
    try:
        deadline = time.monotonic() + EXIT_WITHIN_SECONDS
        while not marker.exists():  # the branch is inside its call
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the stuck node never started"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=EXIT_WITHIN_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
            pytest.fail("Ctrl-C did not end the process")
    assert process.returncode == 130
    assert stderr == "isobranch: interrupted\n"
    assert stdout == ""


def test_close_ends_every_idle_pool_thread_while_one_is_stuck():
    release = threading.Event()
    graph = StateGraph()
    graph.add_node("start", lambda state: {})
    graph.add_node("stuck", lambda state: release.wait(60) and None)
    for name in ("a", "b", "c"):
        graph.add_node(name, lambda state: {})
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.set_entry_point("start")
    for name in ("stuck", "a", "b", "c"):
        graph.add_parallel_edge("start", name, fan_in="join")
    before = set(threading.enumerate())
    app = graph.compile(isolation="thread", max_workers=4, branch_timeout=0.3)
    try:
        results = app.invoke({})["results"]
        assert [r.timed_out for r in results] == [True, False, False, False]
        app.close()
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert len(left) == 1 and left[0].daemon, f"left running: {left}"
    finally:
        release.set()
        app.close()
    left[0].join(10)
    assert not left[0].is_alive()


def test_pool_threads_are_daemons_and_shutdown_joins_the_idle_ones():
    release = threading.Event()
    pool = DaemonThreadPool(3, thread_name_prefix="test-pool")
    stuck = pool.submit(release.wait, 60)
    quick = [pool.submit(pow, 2, n) for n in range(4)]
    assert [f.result(10) for f in quick] == [1, 2, 4, 8]
    threads = pool.threads
    assert threads and all(t.daemon for t in threads)
    # A thread that has handed over its result is idle only once it waits for work
    # again; the one running release.wait waits too, inside its call.
    assert wait_until(lambda: all(blocked_in_threading(t.ident) for t in threads), 30)
    pool.shutdown(wait=False, cancel_futures=True)
    alive = [t for t in threads if t.is_alive()]
    assert len(alive) == 1, "only the thread inside a call may outlive shutdown"
    release.set()
    assert stuck.result(10) is True
    alive[0].join(10)
    assert not alive[0].is_alive()
    with pytest.raises(RuntimeError):
        pool.submit(pow, 2, 2)


def test_pool_shutdown_cancels_queued_calls_and_waits_for_running_ones():
    entered, release = threading.Event(), threading.Event()

    def running():
        entered.set()
        release.wait(60)
        return "ran"

    pool = DaemonThreadPool(1)
    first = pool.submit(running)
    queued = pool.submit(pow, 2, 3)
    assert entered.wait(10)
    caller = threading.get_ident()

    def release_once_shutdown_waits() -> None:  # the running call returns only then
        if wait_until(lambda: blocked_in_threading(caller) and "shutdown" in frames_of(caller),
                      30):
            release.set()

    releaser = threading.Thread(target=release_once_shutdown_waits)
    releaser.start()
    try:
        pool.shutdown(wait=True, cancel_futures=True)
        assert release.is_set(), "shutdown returned before the running call did"
    finally:
        release.set()
        releaser.join(30)
    assert first.result(0) == "ran" and queued.cancelled()
    assert not pool.threads


def test_pool_reports_a_call_s_exception_in_its_future():
    pool = DaemonThreadPool(2)
    try:
        future = pool.submit(int, "not a number")
        with pytest.raises(ValueError):
            future.result(10)
    finally:
        pool.shutdown()
    assert not pool.threads
