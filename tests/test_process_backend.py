"""The process backend: branches in worker processes, immune to crashes and hangs.

The graph-level scenarios that every backend shares (PY-002-*, fan-out
semantics, risk mitigations) run on ``process`` through the ``isolation``
fixture; this file covers what only worker processes can do or break.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import yaml
from benchmarks.proc_scan import is_gone

from conftest import descendants, fan_out, invoke_concurrently, plain_environment, wait_until
from isobranch import (
    GraphError,
    GraphExecutionError,
    StateGraph,
    YAMLEngine,
    available_backends,
)
from isobranch.branch import BranchLimits
from isobranch.context import ExecutionContext
from isobranch.isolation import create_backend
from isobranch.nodes import LuaNode, Node

ROOT = pathlib.Path(__file__).parent.parent
pytestmark = pytest.mark.usefixtures("no_process_leak")


@pytest.fixture
def isolation():
    """The ``load`` fixture compiles on this backend only, in this file."""
    return "process"


def worker_facts(state):
    """What a branch can observe about the process it runs in."""
    # A spawned worker runs one thread of its own that watches for its parent's death.
    threads = [t for t in threading.enumerate() if not t.name.startswith("isobranch-")]
    return {"pid": os.getpid(), "ppid": os.getppid(), "threads": len(threads)}


def segfault(state):
    import ctypes

    ctypes.string_at(0)


def exit_3(state):
    os._exit(3)


def sigkill_self(state):  # what the kernel's OOM killer does
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_long(state):
    time.sleep(60)


def catastrophic_regex(state):
    import re

    # One C call that holds the GIL for far longer than the timeout.
    re.match(r"(a+)+$", "a" * 64 + "b")


# -- 1. a branch runs entirely in a worker ---------------------------------------


def test_branches_run_in_worker_processes_with_fresh_lua_vms():
    def closure_factory(tag):
        return lambda state: {"tag": tag, **worker_facts(state)}

    def local_function(state):
        return {"tag": "local", **worker_facts(state)}

    lua = LuaNode("lua", "local fresh = marker == nil\nmarker = 'set'\n"
                         "return {fresh = fresh, n = #state.items}")
    graph = fan_out(("closure", closure_factory("closure")), ("local", local_function),
                    ("lua", lua), start=lambda s: {"items": [1, 2, 3]})
    with graph.compile(isolation="process", max_workers=2) as compiled:
        for _ in range(3):
            closure, local, lua_result = compiled.invoke({})["results"]
            assert closure.state["tag"] == "closure" and local.state["tag"] == "local"
            for result in (closure, local):
                assert result.isolation == "process"
                assert result.state["pid"] == result.worker != os.getpid()
            # Same worker pool every time, but each branch's Lua VM is new.
            assert lua_result.state["fresh"] is True and lua_result.state["n"] == 3


class CountsItsUnpickling(Node):
    """A node that appends a line to a file each time it is unpickled."""

    def __init__(self, name, log):
        self.name, self.log = name, str(log)

    def __setstate__(self, data):
        self.__dict__.update(data)
        with open(self.log, "a") as log:
            log.write(f"{os.getpid()}\n")

    def run(self, state, context, parallel_results=None):
        return {"ran_in": os.getpid()}


@pytest.mark.parametrize(("start_method", "loads"), [("forkserver", 1), ("spawn", 2)])
def test_the_graph_travels_once_per_pool_not_per_branch(tmp_path, start_method, loads):
    log = tmp_path / "unpickled.log"
    graph = fan_out(*[(f"b{i}", CountsItsUnpickling(f"b{i}", log)) for i in range(4)])
    with graph.compile(isolation="process", max_workers=2,
                       backend_options={"start_method": start_method}) as compiled:
        for _ in range(5):
            assert all(r.success for r in compiled.invoke({})["results"])
    # 20 branches of 4 nodes: the fork server loads the graph (all 4 nodes)
    # once; with spawn each of the 2 workers loads it once.
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * loads and len(set(lines)) == loads


# -- 2. pool lifecycle ------------------------------------------------------------


def test_pool_is_lazy_reused_and_fully_released_by_close():
    outside = descendants()  # another module's, if any: not this test's to judge
    graph = fan_out(("a", worker_facts), ("b", worker_facts))
    compiled = graph.compile(isolation="process", max_workers=2)
    backend = compiled._backend("process", 2)
    assert backend.fork_server_pid is None, "nothing may start before the first fan-out"
    fds_before = set(os.listdir("/proc/self/fd"))
    pids = set()
    for _ in range(4):
        pids |= {r.worker for r in compiled.invoke({})["results"]}
    assert len(pids) <= 2, "workers are reused across invocations"
    server = backend.fork_server_pid
    assert server in descendants() and pids <= descendants(server)
    compiled.close()
    assert not descendants() - outside, "close() leaves no process behind"
    assert set(os.listdir("/proc/self/fd")) <= fds_before, "close() leaves no pipe or socket open"
    with pytest.raises(GraphExecutionError, match="closed"):
        compiled.invoke({})


def test_context_manager_closes_the_pool():
    outside = descendants()
    with fan_out(("a", worker_facts)).compile(isolation="process") as compiled:
        compiled.invoke({})
        assert descendants() - outside
    assert not descendants() - outside


def run_python(code, *args, **kwargs):
    env = plain_environment(TMPDIR=kwargs.pop("tmpdir"))
    return subprocess.run([sys.executable, *args], input=code, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env, **kwargs)


SCRIPT = """
import os, threading
from isobranch import StateGraph
graph = StateGraph()
graph.add_node("start", lambda s: None)
graph.add_node("a", lambda s: {"pid": os.getpid()})
graph.add_node("b", lambda s: {"pid": os.getpid()})
graph.add_fan_in_node("join", lambda s, r: {"pids": [x.state["pid"] for x in r],
                                            "ok": all(x.success for x in r)})
graph.add_parallel_edge("start", "a", fan_in="join")
graph.add_parallel_edge("start", "b", fan_in="join")
graph.set_entry_point("start")
app = graph.compile(isolation="process")
final = app.invoke({})
print("PIDS", *final["pids"], final["ok"])
"""


def _worker_pids(output):
    line = next(line for line in output.splitlines() if line.startswith("PIDS"))
    *pids, ok = line.split()[1:]
    assert ok == "True"
    return [int(pid) for pid in pids]


@pytest.mark.parametrize("how", ["script", "-c", "repl", "stdin"])
def test_works_without_a_main_guard_and_cleans_up_at_interpreter_exit(tmp_path, how):
    # The script never calls close(): interpreter exit must release the pool.
    if how == "script":
        script = tmp_path / "agent.py"
        script.write_text(SCRIPT)
        done = run_python("", str(script), tmpdir=str(tmp_path))
    elif how == "-c":
        done = run_python("", "-c", SCRIPT, tmpdir=str(tmp_path))
    elif how == "repl":
        # Interactive mode: statements arrive one by one, as typed.
        lines = SCRIPT.replace("\n\n", "\n")
        done = run_python(lines, "-i", "-q", tmpdir=str(tmp_path))
    else:
        done = run_python(SCRIPT, "-", tmpdir=str(tmp_path))
    assert done.returncode == 0, done.stderr
    pids = _worker_pids(done.stdout)
    assert len(pids) == 2 and all(is_gone(pid) for pid in pids)
    assert "Traceback" not in done.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "agent.py"]
    assert leftovers == [], "no temp files may be left behind"


def test_works_from_a_non_main_thread():
    graph = fan_out(("a", worker_facts), ("b", worker_facts))
    outcome = {}

    def call():
        with graph.compile(isolation="process") as compiled:
            outcome["results"] = compiled.invoke({})["results"]

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    assert all(r.success and r.state["pid"] != os.getpid() for r in outcome["results"])


# -- 3. start method --------------------------------------------------------------


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_inherit_no_threads_from_the_caller(start_method):
    stop = threading.Event()
    busy = [threading.Thread(target=stop.wait) for _ in range(3)]
    for thread in busy:
        thread.start()
    try:
        graph = fan_out(("a", worker_facts), ("b", worker_facts))
        with graph.compile(isolation="process",
                           backend_options={"start_method": start_method}) as compiled:
            results = compiled.invoke({})["results"]
    finally:
        stop.set()
        for thread in busy:
            thread.join()
    for result in results:
        assert result.state["threads"] == 1
        # Never a fork of this (multi-threaded) process: forked from the fork
        # server, or a fresh interpreter spawned by this one.
        if start_method == "forkserver":
            assert result.state["ppid"] != os.getpid()
        else:
            assert result.state["ppid"] == os.getpid()


def test_unknown_start_method_is_a_graph_error():
    with pytest.raises(GraphError, match="start_method"):
        fan_out(("a", worker_facts)).compile(isolation="process",
                                             backend_options={"start_method": "fork"})


# -- 4. faults stay in their branch ----------------------------------------------


@pytest.mark.parametrize(("crash", "described"), [
    (exit_3, "exited with code 3"),
    (segfault, "signal 11 (SIGSEGV)"),
    (sigkill_self, "signal 9 (SIGKILL"),
])
def test_a_dying_worker_fails_only_its_branch_and_the_pool_recovers(crash, described):
    def maybe_crash(state):
        if state.get("crash"):
            crash(state)
        return {"survived": True}

    graph = fan_out(("ok1", worker_facts), ("dies", maybe_crash), ("ok2", worker_facts),
                    start=lambda s: None)
    with graph.compile(isolation="process", max_workers=3) as compiled:
        ok1, dies, ok2 = compiled.invoke({"crash": True})["results"]
        assert ok1.success and ok2.success
        assert not dies.success and dies.error_type == "WorkerCrashed"
        assert described in dies.error and "branch 'dies'" in dies.error
        assert "node 'dies'" in dies.error and dies.node == "dies"
        assert dies.state == {"crash": True}, "the state as of the failure"
        assert is_gone(dies.worker)
        # The pool is whole again for the next fan-out.
        again = compiled.invoke({"crash": False})["results"]
        assert all(r.success for r in again) and again[1].state["survived"]


def test_a_killed_fork_server_is_replaced_at_the_next_fan_out():
    graph = fan_out(("a", worker_facts), ("b", worker_facts))
    with graph.compile(isolation="process") as compiled:
        compiled.invoke({})
        backend = compiled._backend("process", None)
        old_server = backend.fork_server_pid
        os.kill(old_server, signal.SIGKILL)
        os.waitpid(old_server, 0)
        results = compiled.invoke({})["results"]
        assert all(r.success for r in results)
        assert backend.fork_server_pid not in (None, old_server)


@pytest.mark.parametrize("stuck", [sleep_long, catastrophic_regex], ids=["sleep", "c-call"])
def test_branch_timeout_kills_a_stuck_worker(stuck):
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("first", lambda s: {"first": "done"})
    graph.add_node("stuck", stuck)
    graph.add_node("ok", lambda s: {"ok": True})
    graph.add_fan_in_node("join", lambda s, r: {"results": r})
    graph.add_parallel_edge("start", "first", fan_in="join")
    graph.add_parallel_edge("start", "ok", fan_in="join")
    graph.add_edge("first", "stuck").add_edge("stuck", "join").add_edge("ok", "join")
    graph.set_entry_point("start")
    with graph.compile(isolation="process", branch_timeout=0.5) as compiled:
        begin = time.monotonic()
        stuck_result, ok = compiled.invoke({})["results"]
        assert time.monotonic() - begin < 10
        assert ok.success
        assert stuck_result.timed_out and stuck_result.error_type == "BranchTimeout"
        assert stuck_result.node == "stuck" and "node 'stuck'" in stuck_result.error
        assert stuck_result.state == {"first": "done"}, "updates merged before the kill survive"
        assert is_gone(stuck_result.worker)
        assert all(r.success for r in compiled.invoke({})["results"][1:])


def test_fail_fast_kills_the_rest_promptly_and_names_the_cause(tmp_path):
    def sleeps(name: str):  # notes its worker, then runs for a minute unless killed
        def node(state):
            partial = tmp_path / f".{name}"
            partial.write_text(str(os.getpid()))
            os.replace(partial, tmp_path / name)
            time.sleep(60)
        return node

    def boom(state):  # fails once both siblings run
        deadline = time.monotonic() + 60
        while not ((tmp_path / "slow1").exists() and (tmp_path / "slow2").exists()):
            assert time.monotonic() < deadline, "the siblings never started"
            time.sleep(0.01)  # polling for the files the siblings write
        return 1 / 0

    graph = fan_out(("slow1", sleeps("slow1")), ("boom", boom), ("slow2", sleeps("slow2")))
    with graph.compile(isolation="process", fail_fast=True, max_workers=3) as compiled:
        with pytest.raises(GraphExecutionError) as info:
            compiled.invoke({})
        # Before close(), which would end them anyway: fail_fast itself killed them.
        workers = [int((tmp_path / name).read_text()) for name in ("slow1", "slow2")]
        assert wait_until(lambda: all(is_gone(pid) for pid in workers), 10), (
            "the workers of the running siblings were not killed")
    error = info.value
    assert error.branch == "boom" and error.node == "boom"
    assert error.error_type == "ZeroDivisionError" and "fail_fast" in str(error)
    assert [r.error_type for r in error.results] == ["Cancelled", "ZeroDivisionError", "Cancelled"]


def test_fail_fast_on_a_crashed_worker():
    graph = fan_out(("slow", sleep_long), ("dies", exit_3))
    with graph.compile(isolation="process", fail_fast=True) as compiled, \
            pytest.raises(GraphExecutionError, match="exited with code 3") as info:
        compiled.invoke({})
    assert info.value.branch == "dies" and info.value.error_type == "WorkerCrashed"


class NeedsTwoArguments(Exception):
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


def test_a_result_the_parent_cannot_unpickle_fails_only_that_branch():
    # Pickles in the worker, but unpickling calls NeedsTwoArguments(message) and fails.
    graph = fan_out(("odd", lambda s: {"err": NeedsTwoArguments(1, "x")}), ("ok", worker_facts))
    with graph.compile(isolation="process") as compiled:
        odd, ok = compiled.invoke({})["results"]
    assert ok.success and not odd.success and odd.error_type == "StateCopyError"
    assert "branch 'odd'" in odd.error


def test_lua_timeout_does_not_count_state_conversion(load):
    # Converting this state takes far longer than the Lua timeout; only the
    # Lua call itself is timed, as on the other backends. The premise is
    # checked first: a conversion that got faster than the timeout would
    # leave this test nothing to prove.
    from isobranch.lua.runtime import LuaRuntime

    items, timeout = 3_000_000, 0.1
    started = time.perf_counter()
    assert LuaRuntime(timeout=None).execute_node_code(
        "return {n = #state.items}", {"items": list(range(items))}) == {"n": items}
    converting = time.perf_counter() - started
    assert converting >= 2 * timeout, (f"converting {items:,} items took {converting:.2f} s: "
                                       f"make the state bigger")
    graph = load({
        "settings": {"lua": {"timeout": timeout}, "parallel": {"isolation": "process"}},
        "nodes": [{"name": "start", "run": f"return {{'items': list(range({items}))}}"},
                  {"name": "count", "language": "lua", "run": "return {n = #state.items}"},
                  {"name": "join", "fan_in": True,
                   "run": "return {'n': parallel_results[0].state.get('n'), "
                          "'error': parallel_results[0].error}"}],
        "edges": [{"from": "start", "to": "count", "type": "parallel", "fan_in": "join"}]})
    final = graph.invoke({})
    assert final["error"] is None and final["n"] == items


def test_more_branches_than_workers_all_run():
    graph = fan_out(*[(f"b{i}", lambda s: {"pid": os.getpid()}) for i in range(9)])
    with graph.compile(isolation="process", max_workers=2) as compiled:
        results = compiled.invoke({})["results"]
    assert [r.branch for r in results] == [f"b{i}" for i in range(9)]
    assert all(r.success for r in results) and len({r.worker for r in results}) <= 2


def test_concurrent_invocations_share_one_pool():
    graph = fan_out(*[(f"b{i}", worker_facts) for i in range(3)])
    with graph.compile(isolation="process", max_workers=2) as compiled:
        outcomes = invoke_concurrently(compiled)
    assert len(outcomes) == 4
    pids = {r.worker for final in outcomes for r in final["results"]}
    assert all(r.success for final in outcomes for r in final["results"]) and len(pids) <= 2


# -- 5. Lua at full speed: no hook, a watchdog ------------------------------------


class RecordingWatchdog:
    def __init__(self):
        self.calls = []

    def node_started(self, node):
        self.calls.append(("node", node))

    def node_merged(self, node, update):
        self.calls.append(("merged", node))

    def lua_started(self, chunk, deadline, limit, branch_deadline):
        self.calls.append(("lua", chunk, limit, branch_deadline, deadline is not None))

    def lua_finished(self):
        self.calls.append(("lua_done",))


def test_under_a_watchdog_lua_runs_without_a_hook_and_reports_its_deadline():
    graph = fan_out(("a", worker_facts)).compile(isolation="inline", lua_timeout=7.0)
    watchdog = RecordingWatchdog()
    context = ExecutionContext(graph, fan_out_limits=BranchLimits(), watchdog=watchdog)
    context.enter_node("n")
    assert context.run_lua("execute_node_code", "return {x = 1}", {}, chunk_name="n") == {"x": 1}
    assert context.lua.timeout_hook is False
    assert watchdog.calls == [("node", "n"), ("lua", "n", 7.0, False, True), ("lua_done",)]
    unwatched = ExecutionContext(graph, fan_out_limits=BranchLimits())
    assert unwatched.lua.timeout_hook is True
    context.close()
    graph.close()


LUA_ESCAPES = {
    "loop": "while true do end",
    "pcall-loop": "while true do pcall(function() while true do end end) end",
    "c-call": "local s = string.rep('a', 300000)\nreturn {n = string.find(s, '.-.-.-.-.-.-.-b')}",
    "sort": "local t = {} for i = 1, 3000000 do t[i] = (i * 7919) % 1000003 end "
            "table.sort(t) table.sort(t, function(a, b) return a > b end) return {}",
}


@pytest.mark.parametrize("code", LUA_ESCAPES.values(), ids=LUA_ESCAPES.keys())
def test_lua_timeout_in_a_worker_is_enforced_by_the_watchdog(load, code):
    graph = load({
        "settings": {"lua": {"timeout": 0.4}, "parallel": {"isolation": "process"}},
        "nodes": [{"name": "start", "run": "return {'before': 1}"},
                  {"name": "spin", "language": "lua", "run": code},
                  {"name": "quick", "language": "lua", "run": "return {ok = true}"},
                  {"name": "join", "fan_in": True,
                   "run": "return {'results': parallel_results}"}],
        "edges": [{"from": "start", "to": "spin", "type": "parallel", "fan_in": "join"},
                  {"from": "start", "to": "quick", "type": "parallel", "fan_in": "join"}]})
    begin = time.monotonic()
    spin, quick = graph.invoke({})["results"]
    assert time.monotonic() - begin < 10
    assert quick.success
    assert spin.error_type == "LuaTimeoutError" and not spin.success
    assert "node 'spin' in branch 'spin'" in spin.error and "0.4s timeout" in spin.error
    assert spin.node == "spin" and is_gone(spin.worker)
    assert spin.state == {"before": 1}


def test_lua_cut_by_branch_timeout_is_a_branch_timeout(load):
    graph = load({
        "settings": {"parallel": {"isolation": "process", "branch_timeout": 0.4}},
        "nodes": [{"name": "start", "run": "return {}"},
                  {"name": "spin", "language": "lua", "run": "while true do end"},
                  {"name": "join", "fan_in": True, "run": "return {'results': parallel_results}"}],
        "edges": [{"from": "start", "to": "spin", "type": "parallel", "fan_in": "join"}]})
    (spin,) = graph.invoke({})["results"]
    assert spin.timed_out and spin.error_type == "BranchTimeout"
    assert "branch 'spin' timed out after 0.4s in node 'spin'" in spin.error


def test_lua_timeout_in_an_edge_condition_inside_a_worker(load):
    graph = load({
        "settings": {"lua": {"timeout": 0.3}, "parallel": {"isolation": "process"}},
        "nodes": [{"name": "start", "run": "return {}"},
                  {"name": "a", "run": "return {'a': 1}"},
                  {"name": "b", "run": "return {'b': 1}"},
                  {"name": "join", "fan_in": True, "run": "return {'results': parallel_results}"}],
        "edges": [{"from": "start", "to": "a", "type": "parallel", "fan_in": "join"},
                  {"from": "a", "to": "b", "when": {"lua": "(function() while true do end end)()"}},
                  {"from": "a", "to": "join"}]})
    (a,) = graph.invoke({})["results"]
    assert a.error_type == "LuaTimeoutError" and a.node == "a" and a.state == {"a": 1}


# -- 6. unpicklable state ---------------------------------------------------------


def _generator():
    yield 1


@pytest.mark.parametrize(("make", "kind"), [
    (threading.Lock, "lock"),
    (socket.socket, "socket"),
    (_generator, "generator"),
    (lambda: open(__file__), "TextIOWrapper"),  # noqa: SIM115 (closed by the test)
    (lambda: (lambda: 1), "function"),
])
def test_unpicklable_state_fails_before_any_worker_starts(make, kind):
    value = make()
    outside = descendants()
    try:
        graph = fan_out(("a", worker_facts), start=lambda s: {"a": {"b": [0, 1, 2, value]}})
        with graph.compile(isolation="process") as compiled:
            with pytest.raises(GraphExecutionError) as info:
                compiled.invoke({})
            assert compiled._backend("process", None).fork_server_pid is None
            assert not descendants() - outside, "no worker may start"
    finally:
        if hasattr(value, "close"):
            value.close()
    message = str(info.value)
    assert "state['a']['b'][3]" in message and kind in message
    assert info.value.node == "start" and info.value.error_type == "StateCopyError"


def test_unpicklable_final_branch_state_is_that_branch_failure():
    graph = fan_out(("gen", lambda s: {"g": (i for i in range(3))}), ("ok", worker_facts))
    with graph.compile(isolation="process") as compiled:
        gen, ok = compiled.invoke({})["results"]
    assert ok.success and not gen.success and gen.error_type == "StateCopyError"
    assert "state['g']" in gen.error and "branch 'gen'" in gen.error


def test_a_node_that_cannot_be_pickled_is_named():
    lock = threading.Lock()
    graph = fan_out(("uses_lock", lambda s: {"locked": lock.locked()}))
    with graph.compile(isolation="process") as compiled, \
            pytest.raises(GraphExecutionError, match="node 'uses_lock' cannot be sent") as info:
        compiled.invoke({})
    assert info.value.node == "start"


# -- 7. Python isolation -----------------------------------------------------------


MODULE_PROBE = textwrap.dedent("""
    import json
    seen = getattr(json, "isobranch_probe", None)
    json.isobranch_probe = state["me"]
    import os
    return {"seen": seen, "pid": os.getpid()}
""")


def module_probe_graph(fresh: bool | None, branches=4):
    nodes = [{"name": "start", "run": "return {}"}]
    edges = []
    for index in range(branches):
        nodes.append({"name": f"b{index}", "run": f"state['me'] = 'b{index}'\n" + MODULE_PROBE})
        edges.append({"from": "start", "to": f"b{index}", "type": "parallel", "fan_in": "join"})
    nodes.append({"name": "join", "fan_in": True,
                  "run": "return {'seen': [r.state['seen'] for r in parallel_results], "
                         "'pids': [r.worker for r in parallel_results]}"})
    parallel = {"isolation": "process", "max_workers": 1}
    if fresh is not None:
        parallel["fresh_worker_per_branch"] = fresh
    return YAMLEngine().load_from_dict({"settings": {"parallel": parallel}, "nodes": nodes,
                                        "edges": edges})


def test_reused_workers_share_python_module_state():
    # Documented: without fresh_worker_per_branch a later branch on the same
    # worker sees a module attribute an earlier one set.
    with module_probe_graph(fresh=None) as graph:
        final = graph.invoke({})
    assert len(set(final["pids"])) == 1
    assert final["seen"] == [None, "b0", "b1", "b2"]


def test_fresh_worker_per_branch_isolates_python_module_state():
    with module_probe_graph(fresh=True) as graph:
        first = graph.invoke({})
        second = graph.invoke({})
    assert first["seen"] == second["seen"] == [None] * 4
    pids = first["pids"] + second["pids"]
    assert len(set(pids)) == 8, "every branch ran in a worker that had run nothing else"


def test_fresh_worker_per_branch_as_a_python_keyword():
    engine = YAMLEngine(isolation="process", fresh_worker_per_branch=True)
    graph = engine.load_from_dict(yaml.safe_load("""
    nodes:
      - {name: start, run: "return {}"}
      - {name: a, run: "import os\\nreturn {'pid': os.getpid()}"}
      - {name: join, fan_in: true, run: "return {'pid': parallel_results[0].worker}"}
    edges:
      - {from: start, to: a, type: parallel, fan_in: join}
    """))
    with graph:
        assert graph.invoke({})["pid"] != graph.invoke({})["pid"]
    with fan_out(("a", worker_facts)).compile(isolation="process",
                                              fresh_worker_per_branch=True) as compiled:
        assert compiled.invoke({})["results"][0].worker != compiled.invoke({})["results"][0].worker


def test_nested_fan_out_in_a_worker_runs_on_threads_there():
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("outer", lambda s: {"outer_pid": os.getpid()})
    graph.add_node("in1", lambda s: {"pid": os.getpid()})
    graph.add_node("in2", lambda s: {"pid": os.getpid()})
    graph.add_fan_in_node("inner_join", lambda s, r: {"inner": [(x.isolation, x.state["pid"])
                                                                 for x in r]})
    graph.add_fan_in_node("join", lambda s, r: {"results": r})
    graph.add_parallel_edge("start", "outer", fan_in="join")
    graph.add_parallel_edge("outer", "in1", fan_in="inner_join")
    graph.add_parallel_edge("outer", "in2", fan_in="inner_join")
    graph.add_edge("inner_join", "join")
    graph.set_entry_point("start")
    with graph.compile(isolation="process") as compiled:
        (outer,) = compiled.invoke({})["results"]
    assert outer.success, outer.error
    pid = outer.state["outer_pid"]
    assert outer.state["inner"] == [("thread", pid), ("thread", pid)]


# -- 8. pluggable ------------------------------------------------------------------


def test_process_is_registered_like_any_backend():
    assert "process" in available_backends()
    backend = create_backend("process", max_workers=1)
    assert backend.name == "process"
    backend.close()


@pytest.mark.parametrize("options", [{"max_workers": 0}, {"fresh_worker_per_branch": "yes"}])
def test_invalid_process_options_are_graph_errors(options):
    graph = fan_out(("a", worker_facts))
    max_workers = options.pop("max_workers", None)
    with pytest.raises(GraphError):
        graph.compile(isolation="process", max_workers=max_workers, backend_options=options)


def test_cli_runs_the_example_on_processes():
    done = subprocess.run([sys.executable, "-m", "isobranch", "run",
                           "examples/fan_out_demo.yaml", "--isolation", "process",
                           "--input", '{"items": [4, 8, 15]}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=plain_environment())
    assert done.returncode == 0, done.stderr
    assert '"verdict"' in done.stdout


def test_documented_process_settings_block_runs():
    page = (ROOT / "docs" / "backends.md").read_text()
    section = page.split("## The process backend", 1)[1]
    settings = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert settings["settings"]["parallel"]["isolation"] == "process"
    document = {**settings, "nodes": [
        {"name": "start", "run": "return {}"},
        {"name": "a", "language": "lua", "run": "return {lua = true}"},
        {"name": "join", "fan_in": True, "run": "return {'ok': parallel_results[0].success}"}],
        "edges": [{"from": "start", "to": "a", "type": "parallel", "fan_in": "join"}]}
    with YAMLEngine().load_from_dict(document) as graph:
        assert graph.invoke({})["ok"] is True


# -- concurrency and interruption, synchronised over a loopback socket --------


class Rendezvous:
    """A loopback listener branches report to; a held branch waits for a reply byte.

    Each branch connects to ``state["addr"]`` and sends ``who:branch``; a
    branch named in ``state["hold"]`` then blocks until the test answers.
    """

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(30)
        self.addr = self.server.getsockname()
        self.open: list[socket.socket] = []

    def accept(self, count):
        """The next ``count`` reports, as a set of ``who:branch``; their sockets stay open."""
        seen = set()
        for _ in range(count):
            conn, _ = self.server.accept()
            conn.settimeout(30)
            seen.add(conn.makefile().readline().strip())
            self.open.append(conn)
        return seen

    def close(self):
        for conn in self.open:
            conn.close()
        self.server.close()


def report_and_maybe_hold(name):
    def node(state):
        with socket.create_connection(tuple(state["addr"]), timeout=60) as conn:
            conn.sendall(f"{state['who']}:{name}\n".encode())
            if name in state.get("hold", ()):
                conn.recv(1)  # until the test answers (or closes)
        return {"ran": name}
    return node


def test_a_worker_freed_by_another_invocation_is_picked_up_at_once():
    rendezvous = Rendezvous()
    graph = fan_out(*[(name, report_and_maybe_hold(name)) for name in ("hold", "q1", "q2")])
    finals = {}

    def invoke(who):
        state = {"addr": rendezvous.addr, "who": who, "hold": ["hold"]}
        finals[who] = compiled.invoke(state)

    try:
        with graph.compile(isolation="process", max_workers=2) as compiled:
            first = threading.Thread(target=invoke, args=("first",))
            first.start()
            # first's "hold" keeps one worker; its q1 and q2 share the other.
            assert rendezvous.accept(3) == {"first:hold", "first:q1", "first:q2"}
            second = threading.Thread(target=invoke, args=("second",))
            second.start()
            # second's "hold" takes the free worker; its q1 and q2 must wait...
            assert rendezvous.accept(1) == {"second:hold"}
            for conn in rendezvous.open[:3]:
                conn.sendall(b"x")  # ...until first's hold ends and frees a worker.
            # second's queued branches run on that worker while its own hold still blocks.
            assert rendezvous.accept(2) == {"second:q1", "second:q2"}
            rendezvous.open[3].sendall(b"x")
            first.join(30)
            second.join(30)
    finally:
        rendezvous.close()
    for who in ("first", "second"):
        assert [r.state["ran"] for r in finals[who]["results"]] == ["hold", "q1", "q2"]


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt (a BaseException too) without touching pytest's own."""


def test_an_interrupted_fan_out_kills_its_workers_and_keeps_the_pool_usable():
    rendezvous = Rendezvous()
    graph = fan_out(("hold", report_and_maybe_hold("hold")))

    def interrupt(signum, frame):
        raise Interrupted

    def signal_once_held():
        rendezvous.accept(1)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    outside = descendants()
    try:
        with graph.compile(isolation="process", max_workers=1) as compiled:
            backend = compiled._backend("process", 1)
            helper = threading.Thread(target=signal_once_held)
            helper.start()
            with pytest.raises(Interrupted):
                compiled.invoke({"addr": rendezvous.addr, "who": "a", "hold": ["hold"]})
            helper.join(30)
            # The interrupted branch's worker is gone; only the fork server is left.
            assert descendants() - outside == {backend.fork_server_pid}
            # Its pool place was given back: the single-worker pool still runs a branch.
            final = compiled.invoke({"addr": rendezvous.addr, "who": "b"})
            assert rendezvous.accept(1) == {"b:hold"}
            assert final["results"][0].success
    finally:
        signal.signal(signal.SIGINT, previous)
        rendezvous.close()


def test_start_up_data_nobody_reads_times_out_instead_of_blocking():
    from isobranch.isolation.process.launcher import write_all

    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TimeoutError):
            write_all(write_end, b"x" * (4 * 2**20), timeout=0.2)
    finally:
        os.close(read_end)
        os.close(write_end)


# -- claims of docs/backends.md: garbage collection, a killed caller, Ctrl-C ----------


def test_a_pool_is_released_when_its_graph_is_garbage_collected():
    import gc
    import weakref

    outside = descendants()
    compiled = fan_out(("a", worker_facts), ("b", worker_facts)).compile(isolation="process")
    workers = {r.worker for r in compiled.invoke({})["results"]}
    assert workers <= descendants()
    collected = weakref.ref(compiled)
    del compiled  # never closed: only garbage collection can release the pool
    gc.collect()
    assert collected() is None
    assert not descendants() - outside, "the pool of a collected graph must end with it"


CALLER = """
import pathlib, sys, time
from isobranch import StateGraph

MARKER = pathlib.Path(sys.argv[1])  # travels with the node (a worker's own argv differs)

def stays(state):
    MARKER.write_text("running")
    time.sleep(300)

graph = StateGraph()
graph.add_node("start", lambda state: None)
graph.add_fan_in_node("join", lambda state, results: {})
for name in ("one", "two"):
    graph.add_node(name, stays)
    graph.add_parallel_edge("start", name, fan_in="join")
graph.set_entry_point("start")
graph.compile(isolation="process", max_workers=2).invoke({})
"""


def test_nothing_keeps_running_after_the_caller_is_killed(tmp_path):
    marker = tmp_path / "running"
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert caller.poll() is None and time.monotonic() < deadline, "no branch started"
            time.sleep(0.02)  # polling for the file a branch writes
        below = descendants(caller.pid)  # the fork server and its workers
        assert len(below) >= 2
        caller.kill()  # SIGKILL: no cleanup of any kind runs in the caller
        caller.wait(30)
        deadline = time.monotonic() + 15
        while not all(is_gone(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for processes to exit
        assert [pid for pid in below if not is_gone(pid)] == [], "processes outlived their caller"
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(30)


def interrupts_its_worker_and_server(state):
    # A terminal's Ctrl-C reaches every process of the foreground group: here,
    # the worker and the fork server above it each get their SIGINT directly.
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getppid(), signal.SIGINT)
    return {"pid": os.getpid(), "server": os.getppid()}


def test_worker_processes_ignore_sigint():
    graph = fan_out(("interrupted", interrupts_its_worker_and_server))
    with graph.compile(isolation="process", max_workers=1) as compiled:
        (first,) = compiled.invoke({})["results"]
        assert first.success, first.error
        (again,) = compiled.invoke({})["results"]
    # Neither the worker nor its fork server died of it: both served the next fan-out.
    assert again.success and (again.state["pid"], again.state["server"]) == (
        first.state["pid"], first.state["server"])


def test_the_wire_frames_and_messages_read_back_as_they_were_sent():
    """What the parent sends ahead in one write reads back frame by frame in a worker,
    and every message and control request decodes to what was encoded."""
    import socket
    from multiprocessing.connection import Connection

    from isobranch.isolation.process import wire
    from isobranch.isolation.process.wire import Kind, Request

    ours, theirs = socket.socketpair()
    sender, receiver = Connection(ours.detach()), Connection(theirs.detach())
    try:
        messages = [wire.run_message({"branch": f"b{i}"}) for i in range(3)]
        messages.append(wire.encode(Kind.STEP, "a", wire.encode_update({"x": 1}), "b"))
        wire.send_frames(sender, messages)
        received = [wire.decode(receiver.recv_bytes()) for _ in messages]
    finally:
        sender.close()
        receiver.close()
    assert [m[0] for m in received] == [Kind.RUN] * 3 + [Kind.STEP]
    assert all(type(m[0]) is str for m in received), "kinds travel as plain strings"
    assert [m[1] for m in received[:3]] == [{"branch": f"b{i}"} for i in range(3)]
    assert wire.decode_update(received[3][2]) == {"x": 1} and received[3][3] == "b"
    assert wire.encode_update({"f": lambda: 1}) is None, "an update that does not pickle"
    assert wire.parse_request(wire.fork_request(once=True)) == (Request.FORK, True)
    assert wire.parse_request(wire.fork_request(once=False)) == (Request.FORK, False)
    assert wire.parse_request(wire.reap_request(4242)) == (Request.REAP, 4242)
    assert wire.parse_forked(wire.forked_reply(77)) == 77
    assert wire.parse_reaped(wire.reaped_reply(9)) == 9
    assert wire.parse_forked(b"") is None and wire.parse_reaped(b"") is None
    assert wire.decode_init(wire.init_payload(["/p"], b"graph")) == (["/p"], b"graph")
