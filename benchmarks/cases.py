"""Benchmark cases: each returns a Row comparing a measurement with its baseline.

Every ratio is measured in one run on the same machine, so it does not
depend on how fast the machine is.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lupa.lua54

from isobranch import LuaRuntime, StateGraph
from isobranch.statecopy import StateSnapshot

from .proc_scan import children, rss_bytes

HOT_LOOP = """
local s = 0
for i = 1, %d do
  s = s + (i %% 7) * 3 - (i %% 5)
end
return s
"""


@dataclass
class Row:
    """One line of the benchmark table."""

    name: str
    target: str
    baseline_seconds: float
    measured_seconds: float
    ratio: float
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict:
        """The row as JSON-ready data."""
        return asdict(self)


def speedup_row(name: str, at_least: float, baseline: float, measured: float,
                detail: str) -> Row:
    """A row whose target is being ``at_least`` times faster: ratio = baseline / measured."""
    speedup = baseline / measured
    return Row(name, f">= {at_least:g}x faster", baseline, measured, speedup, speedup >= at_least,
               detail)


def slowdown_row(name: str, at_most: float, against: str, baseline: float, measured: float,
                 detail: str) -> Row:
    """A row whose target is costing at most ``at_most`` times ``against``: ratio = measured / baseline."""
    ratio = measured / baseline
    return Row(name, f"<= {at_most:g}x {against}", baseline, measured, ratio, ratio <= at_most,
               detail)


def added_time_row(name: str, at_most_seconds: float, baseline: float, measured: float,
                   detail: str) -> Row:
    """A row whose target is adding at most ``at_most_seconds`` to the baseline's time:
    ratio = measured / baseline, the verdict on ``measured - baseline``."""
    return Row(name, f"<= {at_most_seconds * 1000:g} ms added", baseline, measured,
               measured / baseline, measured - baseline <= at_most_seconds, detail)


def comparison_row(name: str, baseline: float, measured: float, detail: str) -> Row:
    """A row with no target, only a comparison: ratio = measured / baseline, always ok."""
    return Row(name, "(comparison)", baseline, measured, measured / baseline, True, detail)


def timings(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall time of each of ``repeat`` calls."""
    result = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        result.append(time.perf_counter() - start)
    return result


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Smallest wall time of ``repeat`` calls: the least disturbed measurement."""
    return min(timings(fn, repeat))


def paired_best(baseline: Callable[[], object], measured: Callable[[], object],
                repeat: int) -> tuple[float, float]:
    """Best time of each, measured alternately so machine drift hits both alike."""
    baseline_best, measured_best = round_robin_best([baseline, measured], repeat)
    return baseline_best, measured_best


def round_robin_best(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best time of each function, taking turns so machine drift hits all alike."""
    rounds = [[timings(fn, 1)[0] for fn in fns] for _ in range(repeat)]
    return [min(times) for times in zip(*rounds, strict=True)]


def median_of(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls."""
    return statistics.median(timings(fn, repeat))


def twenty_k_state() -> dict:
    """A JSON-like state with 20,000 items (the size the targets name)."""
    return {"items": [{"id": i, "name": f"item-{i}", "score": i * 0.5, "tags": ["a", "b"],
                       "ok": i % 2 == 0} for i in range(20_000)],
            "meta": {"source": "benchmark", "version": 3}}


def vm_creation(repeat: int = 2000) -> Row:
    """Sandboxed ``LuaRuntime()`` plus a first call, against bare lupa doing the same."""

    def bare() -> None:
        runtime = lupa.lua54.LuaRuntime()
        runtime.execute("return 1")

    def sandboxed() -> None:
        runtime = LuaRuntime()
        runtime.execute("return 1")
        runtime.close()

    def many(fn: Callable[[], None]) -> Callable[[], None]:
        return lambda: [fn() for _ in range(50)]

    rounds = max(repeat // 50, 3)
    baseline, measured = paired_best(many(bare), many(sandboxed), rounds)
    baseline, measured = baseline / 50, measured / 50
    return slowdown_row("sandboxed LuaRuntime() creation + first call", 2.0, "bare lupa",
                        baseline, measured,
                        f"bare {baseline * 1e6:.0f} us, sandboxed {measured * 1e6:.0f} us")


def hot_loop_thread_hook(iterations: int = 5_000_000, repeat: int = 5) -> Row:
    """A hot Lua loop with the timeout armed (count hook) against bare lupa."""
    code = HOT_LOOP % iterations
    bare_runtime = lupa.lua54.LuaRuntime()
    guarded = LuaRuntime(timeout=600.0)
    expected = bare_runtime.execute(code)
    assert guarded.execute(code) == expected
    baseline, measured = paired_best(lambda: bare_runtime.execute(code),
                                     lambda: guarded.execute(code), repeat)
    return slowdown_row("hot Lua loop, timeout armed (inline/thread)", 2.5, "bare lupa",
                        baseline, measured, f"{iterations:,} iterations")


def _fan_out_graph(branches: int, node: Callable[[str], object], isolation: str,
                   max_workers: int | None = None, **backend_options: object):
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_fan_in_node("join", lambda state, results: {"ok": all(r.success for r in results)})
    for index in range(branches):
        name = f"b{index}"
        graph.add_node(name, node(name))
        graph.add_parallel_edge("start", name, fan_in="join")
    graph.set_entry_point("start")
    graph.set_finish_point("join")
    return graph.compile(isolation=isolation, max_workers=max_workers,
                         backend_options=backend_options)


def lua_branches_thread_vs_inline(branches: int = 8, iterations: int = 3_000_000,
                                  repeat: int = 3) -> Row:
    """Eight CPU-bound Lua branches: thread backend against inline."""
    from isobranch.nodes import LuaNode

    code = HOT_LOOP % iterations
    inline = _fan_out_graph(branches, lambda name: LuaNode(name, code), "inline")
    threaded = _fan_out_graph(branches, lambda name: LuaNode(name, code), "thread",
                              max_workers=branches)
    with inline, threaded:
        assert inline.invoke({})["ok"] and threaded.invoke({})["ok"]
        baseline, measured = paired_best(lambda: inline.invoke({}),
                                         lambda: threaded.invoke({}), repeat)
    return speedup_row(f"{branches} CPU-bound Lua branches, thread vs inline ({os.cpu_count()} cores)",
                       1.8, baseline, measured, f"inline {baseline:.2f} s, thread {measured:.2f} s")


def per_branch_overhead(isolation: str, target_ms: float | None, repeat: int = 30,
                        branches: int = 64, **backend_options: object) -> Row:
    """Extra wall time per trivial branch on a warm pool: (t(N) - t(1)) / (N - 1)."""

    def trivial(name: str):
        return lambda state: {"done": True}

    many = _fan_out_graph(branches, trivial, isolation, **backend_options)
    one = _fan_out_graph(1, trivial, isolation, **backend_options)
    with many, one:
        many.invoke({"payload": list(range(20))})  # warm the pool
        one.invoke({"payload": list(range(20))})
        baseline = median_of(lambda: one.invoke({"payload": list(range(20))}), repeat)
        measured = median_of(lambda: many.invoke({"payload": list(range(20))}), repeat)
    per_branch = (measured - baseline) / (branches - 1)
    target = f"<= {target_ms} ms" if target_ms is not None else "(reference)"
    ok = target_ms is None or per_branch * 1000 <= target_ms
    ratio = per_branch * 1000 / target_ms if target_ms else per_branch * 1000
    mode = ", ".join([isolation, *(k for k, v in backend_options.items() if v is True)])
    return Row(f"per-branch overhead, trivial branch, warm pool ({mode})", target,
               baseline, measured, ratio, ok,
               f"{per_branch * 1000:.3f} ms per branch; a 1-branch fan-out takes "
               f"{baseline * 1000:.2f} ms (ratio column: ms / target)")


def hot_loop_process(iterations: int = 60_000_000, repeat: int = 3) -> Row:
    """A hot Lua loop in a process branch (limits armed, watchdog, no hook) against bare lupa."""
    from isobranch.nodes import LuaNode

    code = HOT_LOOP % iterations
    bare_runtime = lupa.lua54.LuaRuntime()
    expected = bare_runtime.execute(code)
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("loop", LuaNode("loop", "return {s = (function() " + code + " end)()}"))
    graph.add_fan_in_node("join", lambda state, results: {"s": results[0].state.get("s")})
    graph.add_parallel_edge("start", "loop", fan_in="join")
    graph.set_entry_point("start")
    # Every limit armed: Lua timeout, memory limit, branch timeout.
    with graph.compile(isolation="process", branch_timeout=600, lua_timeout=600,
                       lua_max_memory=256 * 2**20) as compiled:
        assert compiled.invoke({})["s"] == expected
        baseline, measured = paired_best(lambda: bare_runtime.execute(code),
                                         lambda: compiled.invoke({}), repeat)
    return slowdown_row("hot Lua loop, limits armed, process backend (whole fan-out)", 1.10,
                        "bare lupa", baseline, measured,
                        f"{iterations:,} iterations: bare {baseline:.2f} s, "
                        f"process branch {measured:.2f} s")


def _busy_python(iterations: int) -> Callable[[str], Callable[[dict], dict]]:
    def busy(name: str):
        def node(state: dict) -> dict:
            total = 0
            for i in range(iterations):
                total += i * i % 7
            return {"total": total}
        return node
    return busy


def python_branches_process_vs_inline(branches: int = 8, iterations: int = 5_000_000,
                                      repeat: int = 3) -> Row:
    """Eight CPU-bound Python branches: process backend against inline."""
    busy = _busy_python(iterations)
    inline = _fan_out_graph(branches, busy, "inline")
    processes = _fan_out_graph(branches, busy, "process")
    with inline, processes:
        assert inline.invoke({})["ok"] and processes.invoke({})["ok"]
        baseline, measured = paired_best(lambda: inline.invoke({}),
                                         lambda: processes.invoke({}), repeat)
    return speedup_row(f"{branches} CPU-bound Python branches, process vs inline "
                       f"({os.cpu_count()} cores)", 1.7, baseline, measured,
                       f"inline {baseline:.2f} s, process {measured:.2f} s")


def python_branches_dask_vs_process(branches: int = 8, iterations: int = 5_000_000,
                                    repeat: int = 3) -> Row:
    """Eight CPU-bound Python branches on a local Dask cluster, against process and inline.

    Both pools have one worker per core; the ratio column is dask time over
    process time (below 1 would mean dask is faster).
    """
    busy = _busy_python(iterations)
    inline = _fan_out_graph(branches, busy, "inline")
    processes = _fan_out_graph(branches, busy, "process")
    dask = _fan_out_graph(branches, busy, "dask")
    with inline, processes, dask:
        assert inline.invoke({})["ok"] and processes.invoke({})["ok"] and dask.invoke({})["ok"]
        inline_s, process_s, dask_s = round_robin_best(
            [lambda: inline.invoke({}), lambda: processes.invoke({}), lambda: dask.invoke({})],
            repeat)
    return comparison_row(f"{branches} CPU-bound Python branches, dask LocalCluster vs process "
                          f"({os.cpu_count()} cores)", process_s, dask_s,
                          f"inline {inline_s:.2f} s, process {process_s:.2f} s "
                          f"({inline_s / process_s:.2f}x), dask {dask_s:.2f} s "
                          f"({inline_s / dask_s:.2f}x)")


def dask_start_tls_vs_plain(workers: int = 2, repeat: int = 3) -> Row:
    """Starting isobranch's local cluster (TLS, fresh credentials) against the same cluster in plain TCP.

    Each start runs one task and closes the cluster again; the ratio column
    is TLS time over plain time.
    """
    import logging

    import distributed

    from isobranch.isolation.dask_cluster import start_local_cluster

    def secured() -> None:
        connection = start_local_cluster(workers, 30.0)
        try:
            assert connection.address.startswith("tls://")
            connection.client.submit(sum, [1, 2]).result()
        finally:
            connection.close()

    def plain() -> None:
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", scheduler_port=0,
                                      dashboard_address="127.0.0.1:0",
                                      silence_logs=logging.CRITICAL) as cluster, \
                distributed.Client(cluster, set_as_default=False) as client:
            client.submit(sum, [1, 2]).result()

    plain_s, tls_s = round_robin_best([plain, secured], repeat)
    return comparison_row(f"local Dask cluster start, TLS vs plain TCP ({workers} workers)",
                          plain_s, tls_s, f"plain {plain_s:.2f} s, TLS {tls_s:.2f} s "
                          f"(start, one task, close)")


def state_copy(repeat: int = 7) -> Row:
    """Copying a 20k-item state for a branch against ``copy.deepcopy``."""
    state = twenty_k_state()
    assert StateSnapshot(state).copy() == state
    baseline, measured = paired_best(lambda: copy.deepcopy(state),
                                     lambda: StateSnapshot(state).copy(), repeat)
    return speedup_row("state copy for a branch (20k items), snapshot vs deepcopy", 3.0, baseline,
                       measured,
                       f"deepcopy {baseline * 1000:.1f} ms, snapshot+copy {measured * 1000:.1f} ms")


def _eager_codec_round_trip() -> Callable[[dict], object]:
    """The codec as it was before states crossed lazily, in a bare lupa VM.

    The whole state is decoded into Lua tables and the whole result encoded
    back, with no sandbox and no hook: a lower bound of what that design's
    round trip cost, measured as the baseline of ``lua_round_trip``.
    """
    import marshal

    vm = lupa.lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    make = vm.eval(b"""function(source)
      local codec = load(source, "=eager_codec", "t", {})({
        type = type, next = next, error = error, tostring = tostring, rawget = rawget,
        rawlen = rawlen, setmetatable = setmetatable, math_type = math.type,
        format = string.format, sub = string.sub, byte = string.byte, char = string.char,
        concat = table.concat, unpack_string = string.unpack, pack_string = string.pack,
        CONVERT = "convert: ", MAX_DEPTH = 200, DEPTH_REASON = "too deep"})
      return function(data)
        collectgarbage("stop")
        local state = codec.decode(data)
        collectgarbage("restart")
        collectgarbage("stop")
        local encoded = codec.encode(state)
        collectgarbage("restart")
        return encoded
      end
    end""")
    source = (Path(__file__).parent / "eager_codec.lua").read_bytes()
    round_trip = make(source)
    return lambda state: marshal.loads(round_trip(marshal.dumps(state, 4)))


def lua_round_trip(repeat: int = 5) -> Row:
    """Python state -> Lua tables -> Python for a 20k-item state, read and returned whole.

    ``return state`` converts every value both ways (the encoder fills the
    lazy state first), against the earlier eager codec in the same run.
    """
    state = twenty_k_state()
    runtime = LuaRuntime()
    eager = _eager_codec_round_trip()
    assert runtime.execute_node_code("return state", state) == state == eager(state)
    baseline, measured = paired_best(lambda: eager(state),
                                     lambda: runtime.execute_node_code("return state", state),
                                     repeat)
    # CPU time too: on a machine loaded by others the wall time is mostly waiting.
    cpu = min(_cpu_seconds(lambda: runtime.execute_node_code("return state", state))
              for _ in range(repeat))
    return Row("Lua round trip of a 20k-item state", "<= 100 ms", baseline, measured,
               measured / 0.1, measured <= 0.1,
               f"{measured * 1000:.1f} ms ({cpu * 1000:.1f} ms CPU); the eager codec "
               f"(bare VM, no hook) {baseline * 1000:.1f} ms")


def _cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def lua_small_read(repeat: int = 200) -> Row:
    """A Lua node reading one small key of a 20k-item state, against the same node on that key alone."""
    big = {"k": 1, **twenty_k_state()}
    small = {"k": 1}
    code = "return {n = state.k + 1}"
    runtime = LuaRuntime()
    assert runtime.execute_node_code(code, big) == runtime.execute_node_code(code, small) == {
        "n": 2}
    baseline, measured = paired_best(lambda: runtime.execute_node_code(code, small),
                                     lambda: runtime.execute_node_code(code, big), repeat)
    return Row("Lua node reading one small key of a 20k-item state", "<= 2 ms", baseline,
               measured, measured / 0.002, measured <= 0.002,
               f"{measured * 1000:.3f} ms; the same node on {{k}} alone "
               f"{baseline * 1000:.3f} ms ({measured / baseline:.1f}x)")


def branch_soak(branches: int = 10_000, isolation: str = "thread") -> Row:
    """10,000 Lua branch runs in one process: RSS growth, threads and processes stay flat."""
    from isobranch.nodes import LuaNode

    graph = _fan_out_graph(100, lambda name: LuaNode(name, "x = {} return {n = 1}"), isolation,
                           max_workers=4)
    with graph:
        graph.invoke({})
        gc.collect()
        rss_before, threads_before = rss_bytes(), threading.active_count()
        processes_before = len(children())
        start = time.perf_counter()
        for _ in range(branches // 100):
            graph.invoke({})
        elapsed = time.perf_counter() - start
        gc.collect()
        growth = rss_bytes() - rss_before
        threads_after = threading.active_count()
        processes_after = len(children())
    processes_left = len(children())
    growth_mib = growth / 2**20
    flat = (threads_after == threads_before and processes_after == processes_before
            and processes_left == 0)
    return Row(f"{branches:,} Lua branch runs ({isolation}): RSS growth",
               "< 20 MiB, threads/processes flat", 20.0, growth_mib, growth_mib / 20.0,
               growth_mib < 20 and flat,
               f"{growth_mib:.1f} MiB, threads {threads_before}->{threads_after}, "
               f"processes {processes_before}->{processes_after}->{processes_left} after close, "
               f"{elapsed / branches * 1000:.3f} ms per branch")
