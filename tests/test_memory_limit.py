"""``branch_max_memory``: a branch past its memory limit fails alone, as ``BranchMemoryError``.

The process backend caps each branch in its worker (``RLIMIT_DATA``); the
local Dask cluster caps each worker; inline and thread cannot and refuse the
setting when the graph is compiled.
"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import HAVE_DASK, descendants, fan_out
from isobranch import END, START, GraphError, StateGraph, YAMLEngine
from isobranch.branch import BranchLimits, BranchTask, cancelled_result, timed_out_result
from isobranch.isolation import memory_limit
from isobranch.isolation.process import branches as process_branches
from isobranch.statecopy import StateSnapshot

MiB = 1024 * 1024
LIMIT = 256 * MiB


def one_block(state):
    block = bytearray(512 * MiB)
    return {"size": len(block)}


def many_chunks(state):
    chunks = []
    while len(chunks) < 2048:  # 2 GiB, far past the limit
        chunks.append(bytearray(MiB))
    return {"chunks": len(chunks)}


def sibling(state):
    kept = bytearray(64 * MiB)  # well inside the limit
    return {"ok": len(kept), "pid": os.getpid()}


@pytest.mark.usefixtures("no_process_leak")
@pytest.mark.parametrize("hog", [one_block, many_chunks], ids=["one-block", "many-chunks"])
def test_a_process_branch_past_its_limit_fails_alone_twice_on_one_graph(hog):
    graph = fan_out(("hog", hog), ("sibling", sibling))
    with graph.compile(isolation="process", max_workers=2, branch_max_memory=LIMIT) as app:
        hog_workers = []
        for _ in range(2):
            hogged, fine = app.invoke({})["results"]
            assert not hogged.success and hogged.error_type == "BranchMemoryError"
            assert "'hog'" in hogged.error and "256 MiB" in hogged.error, hogged.error
            assert hogged.node == "hog" and not hogged.timed_out
            assert fine.success and fine.state["ok"] == 64 * MiB
            hog_workers.append(hogged.worker)
            # The worker an allocation failed in is replaced, not reused.
            assert hogged.worker not in descendants()
        assert hog_workers[0] != hog_workers[1]


@pytest.mark.usefixtures("no_process_leak")
def test_lua_allocations_count_against_the_branch_limit():
    from isobranch.nodes import LuaNode

    # Lua's own max_memory (512 MiB by default) is above the branch limit.
    grows = LuaNode("grows", "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i "
                             "end return {n = #t}")
    graph = fan_out(("grows", grows), ("sibling", sibling))
    with graph.compile(isolation="process", branch_max_memory="128MiB") as app:
        grown, fine = app.invoke({})["results"]
    assert grown.error_type == "BranchMemoryError" and "128 MiB" in grown.error
    assert "'grows'" in grown.error and fine.success


@pytest.mark.usefixtures("no_process_leak")
def test_lua_reaching_its_own_smaller_max_memory_stays_a_lua_memory_error():
    from isobranch.nodes import LuaNode

    grows = LuaNode("grows", "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i "
                             "end return {n = #t}")
    graph = fan_out(("grows", grows), ("sibling", sibling))
    with graph.compile(isolation="process", branch_max_memory="256MiB",
                       lua_max_memory=16 * 2**20) as app:
        grown, fine = app.invoke({})["results"]
    assert grown.error_type == "LuaMemoryError" and fine.success
    assert "max_memory=16777216" in grown.error


@pytest.mark.usefixtures("no_process_leak")
def test_a_memory_error_raised_in_a_python_node_is_a_branch_memory_error():
    def raises(state):
        raise MemoryError("simulated")

    graph = fan_out(("raises", raises), ("sibling", sibling))
    with graph.compile(isolation="process", branch_max_memory="256MiB") as limited:
        failed, fine = limited.invoke({})["results"]
    assert failed.error_type == "BranchMemoryError" and fine.success
    assert failed.error == ("branch 'raises' ran out of memory in node 'raises' "
                           "(branch_max_memory 256 MiB): an allocation past the limit was "
                           "refused (MemoryError: simulated)")
    with graph.compile(isolation="process") as unlimited:
        failed, _ = unlimited.invoke({})["results"]
    assert failed.error_type == "MemoryError", "without a limit a MemoryError is just that"


@pytest.mark.usefixtures("no_process_leak")
def test_a_worker_the_oom_killer_ends_is_a_branch_memory_error(monkeypatch):
    # The kernel's OOM-kill counter, as seen by the parent: it goes up while
    # the branch runs, and the worker dies by a SIGKILL nobody here sent.
    kills = iter(range(10, 100))
    monkeypatch.setattr(memory_limit, "kernel_oom_kills", lambda: next(kills))
    monkeypatch.setattr(process_branches, "kernel_oom_kills", lambda: next(kills))

    def killed(state):
        os.kill(os.getpid(), signal.SIGKILL)

    graph = fan_out(("killed", killed), ("sibling", sibling))
    with graph.compile(isolation="process", branch_max_memory=LIMIT) as app:
        failed, fine = app.invoke({})["results"]
    assert failed.error_type == "BranchMemoryError" and fine.success
    assert "out-of-memory killer" in failed.error and "256 MiB" in failed.error
    assert "'killed'" in failed.error


@pytest.mark.usefixtures("no_process_leak")
def test_a_sigkill_without_an_oom_kill_stays_a_worker_crash(monkeypatch):
    monkeypatch.setattr(memory_limit, "kernel_oom_kills", lambda: 3)
    monkeypatch.setattr(process_branches, "kernel_oom_kills", lambda: 3)

    def killed(state):
        os.kill(os.getpid(), signal.SIGKILL)

    with fan_out(("killed", killed)).compile(isolation="process",
                                             branch_max_memory=LIMIT) as app:
        (failed,) = app.invoke({})["results"]
    assert failed.error_type == "WorkerCrashed"


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_backends_that_cannot_enforce_it_refuse_it_at_compile_time(isolation):
    with pytest.raises(GraphError) as caught:
        fan_out(("a", sibling)).compile(isolation=isolation, branch_max_memory=LIMIT)
    message = str(caught.value)
    assert f"isolation {isolation!r} cannot enforce" in message
    assert "'process'" in message and "'dask'" in message


def test_a_config_override_to_a_backend_that_cannot_enforce_it_is_refused():
    graph = fan_out(("a", sibling))
    with graph.compile(isolation="process", branch_max_memory=LIMIT) as app, \
            pytest.raises(GraphError, match="isolation 'thread' cannot enforce"):
        app.invoke({}, config={"isolation": "thread"})


@pytest.mark.parametrize("bad", [0, -5, True, "lots", "12 parsecs"])
def test_an_invalid_limit_is_a_graph_error(bad):
    with pytest.raises(GraphError, match="branch_max_memory"):
        fan_out(("a", sibling)).compile(isolation="process", branch_max_memory=bad)


FLOW = {
    "settings": {"parallel": {"isolation": "process", "branch_max_memory": "256MiB"}},
    "nodes": [{"name": "only", "run": "return {'pid': __import__('os').getpid()}"}],
}


def test_the_yaml_setting_and_the_engine_keyword_are_parsed():
    with YAMLEngine().load_from_dict(FLOW) as graph:
        assert graph.branch_max_memory == LIMIT
    with YAMLEngine(branch_max_memory="1GiB").load_from_dict(FLOW) as graph:
        assert graph.branch_max_memory == 1024 * MiB
    with YAMLEngine(branch_max_memory=3 * MiB).load_from_dict(FLOW) as graph:
        assert graph.branch_max_memory == 3 * MiB


def test_a_bad_yaml_setting_names_its_key():
    document = {**FLOW, "settings": {"parallel": {"isolation": "process",
                                                  "branch_max_memory": "huge"}}}
    with pytest.raises(GraphError, match=r"settings\.parallel\.branch_max_memory: not a size"):
        YAMLEngine().load_from_dict(document)


def test_the_yaml_setting_is_refused_on_the_thread_backend():
    with pytest.raises(GraphError, match="isolation 'thread' cannot enforce"):
        YAMLEngine(isolation="thread").load_from_dict(FLOW)


def read_oom_score(state):
    with open("/proc/self/oom_score_adj") as adj:
        return {"adj": int(adj.read()), "pid": os.getpid()}


@pytest.mark.usefixtures("no_process_leak")
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_worker_processes_raise_their_oom_score(start_method):
    with open("/proc/self/oom_score_adj") as adj:
        caller = int(adj.read())
    graph = fan_out(("score", read_oom_score))
    with graph.compile(isolation="process", start_method=start_method) as app:
        (result,) = app.invoke({})["results"]
        with open(f"/proc/{result.state['pid']}/oom_score_adj") as adj:
            assert int(adj.read()) == memory_limit.WORKER_OOM_SCORE_ADJ
        backend = next(iter(app._backends.values()))
        if start_method == "forkserver":
            with open(f"/proc/{backend.fork_server_pid}/oom_score_adj") as adj:
                assert int(adj.read()) == memory_limit.WORKER_OOM_SCORE_ADJ
    assert result.state["adj"] == memory_limit.WORKER_OOM_SCORE_ADJ
    with open("/proc/self/oom_score_adj") as adj:
        assert int(adj.read()) == caller, "the caller's own score is left alone"


def test_data_limit_is_put_back_after_the_block():
    import resource

    before = resource.getrlimit(resource.RLIMIT_DATA)
    with memory_limit.data_limit(LIMIT):
        soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
        assert soft != resource.RLIM_INFINITY and soft >= LIMIT
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed: "
                                "pip install -e '.[test,dask]'")


@needs_dask
@pytest.mark.parametrize("given", [{"dask_address": "tcp://127.0.0.1:8786"}, {"client": "?"}])
def test_dask_with_a_cluster_of_the_user_s_refuses_it(given):
    if "client" in given:
        class Client:  # stands in for a distributed.Client; compile never touches it
            status = "running"
        given = {"client": Client()}
    with pytest.raises(GraphError, match=r"configured by its owner.*memory-limit"):
        fan_out(("a", sibling)).compile(isolation="dask", branch_max_memory=LIMIT, **given)


def dask_hog(state):
    import time

    block = b"x" * (512 * MiB)  # written, so resident
    while block:  # held until the nanny restarts the worker (branch_timeout bounds it)
        time.sleep(0.05)


@needs_dask
@pytest.mark.usefixtures("no_process_leak")
def test_a_dask_worker_past_the_limit_is_restarted_and_its_branch_fails_alone():
    graph = fan_out(("hog", dask_hog), ("sibling", sibling), ("score", read_oom_score))
    with graph.compile(isolation="dask", max_workers=3, branch_timeout=60,
                       branch_max_memory=LIMIT) as app:
        hogged, fine, score = app.invoke({})["results"]
    assert hogged.error_type == "BranchMemoryError", hogged.error
    assert "256 MiB" in hogged.error and "'hog'" in hogged.error and "nanny" in hogged.error
    assert not hogged.timed_out
    assert fine.success and score.success
    assert score.state["adj"] == memory_limit.WORKER_OOM_SCORE_ADJ


@needs_dask
def test_dask_refuses_a_limit_too_small_for_a_worker_to_start():
    with pytest.raises(GraphError, match="Dask worker uses about 60 MiB by itself"):
        fan_out(("a", sibling)).compile(isolation="dask", branch_max_memory="64MiB")


# -- a map branch that runs out of memory is named like every map branch ----------------------


def map_over_items(work):
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(5))})
    graph.add_node("work", work)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_map_edge("start", "work", over="items", fan_in="join")
    graph.add_edge(START, "start")
    graph.add_edge("join", END)
    return graph


def hog_at_three(state):
    if state["index"] == 3:
        return one_block(state)
    return {"ok": state["item"]}


def killed_at_three(state):
    if state["index"] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"ok": state["item"]}


@pytest.mark.usefixtures("no_process_leak")
@pytest.mark.parametrize("work", [hog_at_three, killed_at_three], ids=["refused", "oom-killed"])
def test_a_map_branch_out_of_memory_is_named_and_indexed_like_its_siblings(work, monkeypatch):
    kills = iter(range(10, 1000))
    monkeypatch.setattr(memory_limit, "kernel_oom_kills", lambda: next(kills))
    monkeypatch.setattr(process_branches, "kernel_oom_kills", lambda: next(kills))
    with map_over_items(work).compile(isolation="process", max_workers=2,
                                      branch_max_memory=LIMIT) as app:
        results = app.invoke({})["results"]
    assert [(r.branch, r.index) for r in results] == [(f"work[{i}]", i) for i in range(5)]
    failed = results[3]
    assert failed.error_type == "BranchMemoryError" and "branch 'work[3]'" in failed.error
    assert all(r.success for r in results if r.index != 3)


def test_every_failure_result_built_for_a_map_branch_carries_its_name_and_index():
    task = BranchTask(graph=None, name="work[3]", start="work", fan_in="join", snapshot=StateSnapshot({}),
                      limits=BranchLimits(branch_timeout=1.0, branch_max_memory=LIMIT),
                      isolation="process", index=3)
    results = {"cancelled": cancelled_result(task, "stopped"),
               "timed out": timed_out_result(task, None),
               "escaped MemoryError": memory_limit.out_of_memory_result(task, 1.0)}
    assert {kind: (r.branch, r.index, r.success) for kind, r in results.items()} == {
        kind: ("work[3]", 3, False) for kind in results}
    assert "branch 'work[3]'" in results["escaped MemoryError"].error
