"""The async API: ainvoke / astream / aresume, cancellation, and async nodes, on every backend.

Each backend gets one compiled graph for the module (a Dask cluster takes
seconds to start). Its branches are chosen by the input state: ``mode``
"quick" returns at once, "sleep" sleeps in Python, "spin" loops in Lua
forever (``lua_timeout=None``: only a cancellation ends it). Every branch
first writes a mark file (pid and thread) into ``state["marks"]``, so a
test can tell which branches started and check that what ran them stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest

from conftest import BACKENDS, frames_of, wait_until
from isobranch import END, START, GraphExecutionError, StateGraph
from isobranch.cancellation import CancelSignal
from isobranch.errors import RunCancelled
from isobranch.nodes import LuaNode

BRANCHES = ("b1", "b2", "b3")


def _mark_node(name: str):
    async def mark(state):
        marks = state.get("marks")
        if marks:
            path = os.path.join(marks, f"{name}-{os.getpid()}-{threading.get_ident()}")
            with open(path, "w"):
                pass
        await asyncio.sleep(0)
        if state.get("mode") == "sleep":
            time.sleep(0.3)
        return {"branch": name}
    return mark


def build_graph() -> StateGraph:
    """prep -> b1/b2/b3 (async mark, then Lua) -> join (async) -> async router -> big|small."""
    graph = StateGraph()

    async def prep(state):
        await asyncio.sleep(0)
        return {"x": state.get("x", 1)}

    async def join(state, results):
        await asyncio.sleep(0)
        return {"total": sum(sum(v for k, v in r.state.items() if k.startswith("v"))
                             for r in results if r.success),
                "ok": [r.success for r in results]}

    async def route(state):
        await asyncio.sleep(0)
        return "big" if state["total"] > 10 else "small"

    async def is_large(state):
        return state["total"] > 100

    graph.add_node("prep", prep)
    for number, name in enumerate(BRANCHES, 1):
        lua = f"l{number}"
        graph.add_node(name, _mark_node(name))
        graph.add_node(lua, LuaNode(lua, f"""
            if state.mode == "spin" then while true do end end
            return {{v{number} = state.x * {number}}}"""))
        graph.add_parallel_edge("prep", name, fan_in="join")
        graph.add_edge(name, lua)
        graph.add_edge(lua, "join")
    graph.add_fan_in_node("join", join)
    graph.add_conditional_edges("join", route, {"big": "big", "small": "small"})
    graph.add_node("big", lambda state: {"size": "big"})
    graph.add_node("small", lambda state: {"size": "small"})
    graph.add_node("huge", lambda state: {"size": "huge"})
    graph.add_edge("big", "huge", when=is_large)
    graph.set_finish_point("big")
    graph.add_edge(START, "prep")
    graph.add_edge("small", END)
    graph.add_edge("huge", END)
    return graph


def expected(x: int) -> dict:
    total = 6 * x
    size = "huge" if total > 100 else "big" if total > 10 else "small"
    return {"x": x, "total": total, "ok": [True] * 3, "size": size}


@pytest.fixture(scope="module", params=BACKENDS)
def app(request):
    compiled = build_graph().compile(isolation=request.param, max_workers=2, lua_timeout=None)
    compiled.invoke({"x": 1})  # pools and clusters start here, not in a timed test
    yield compiled
    compiled.close()


def final(state: dict) -> dict:
    return {key: state[key] for key in ("x", "total", "ok", "size")}


# -- results -------------------------------------------------------------------


def test_ainvoke_matches_invoke_with_async_nodes_routers_and_conditions(app):
    for x in (1, 3, 20):
        assert final(asyncio.run(app.ainvoke({"x": x}))) == expected(x) == final(app.invoke({"x": x}))


def test_astream_yields_the_events_stream_does(app):
    async def collect():
        return [event async for event in app.astream({"x": 3})]

    def shape(events):
        return [(e["type"], e.get("node"), e.get("branch")) for e in events
                if e["type"] != "branch"] + sorted(e["branch"] for e in events
                                                   if e["type"] == "branch")

    events = asyncio.run(collect())
    assert shape(events) == shape(list(app.stream({"x": 3})))
    assert final(events[-1]["state"]) == expected(3)


def test_sixteen_concurrent_ainvoke_on_one_graph(app):
    async def many():
        return await asyncio.gather(*(app.ainvoke({"x": x}) for x in range(16)))

    assert [final(state) for state in asyncio.run(many())] == [expected(x) for x in range(16)]


def test_concurrent_ainvoke_calls_really_run_at_once():
    # Each run's first node waits until all 16 runs are inside it: runs that
    # were serialised (or squeezed through a few threads) break the barrier.
    barrier = threading.Barrier(16, timeout=20)
    graph = StateGraph()
    graph.add_node("meet", lambda state: {"met": barrier.wait() >= 0})
    graph.add_edge(START, "meet")
    graph.add_edge("meet", END)
    with graph.compile(isolation="inline") as compiled:
        async def many():
            return await asyncio.gather(*(compiled.ainvoke({}) for _ in range(16)))

        assert all(state["met"] for state in asyncio.run(many()))


def test_the_event_loop_keeps_ticking_during_a_long_run(app):
    async def run_with_ticker():
        gaps: list[float] = []

        async def ticker():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        state = await app.ainvoke({"x": 1, "mode": "sleep"})
        took = time.monotonic() - started
        ticking.cancel()
        return state, took, gaps

    state, took, gaps = asyncio.run(run_with_ticker())
    assert final(state) == expected(1)
    assert took >= 0.3, "each branch sleeps 0.3 s"
    # A blocked loop would show one gap as long as the run; a free one ticks throughout.
    assert len(gaps) >= 5 and max(gaps) < took / 2, (took, max(gaps))


# -- cancellation --------------------------------------------------------------


def _started(marks) -> list[tuple[str, int, int]]:
    found = []
    for entry in os.listdir(marks):
        name, pid, ident = entry.rsplit("-", 2)
        found.append((name, int(pid), int(ident)))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _until_marked(marks, task: asyncio.Task) -> None:
    """Wait until a branch wrote its mark (the run is under way), failing if the run ended."""
    deadline = time.monotonic() + 60
    while not os.listdir(marks):
        assert not task.done(), "the run ended before any branch started"
        assert time.monotonic() < deadline, "no branch started within 60 s"
        await asyncio.sleep(0.01)


async def _cancel_once_started(how: str, run, marks) -> float:
    """Start ``run()``, cancel it ``how`` once a branch runs; seconds from cancel to raise."""
    task = asyncio.create_task(run())
    await _until_marked(marks, task)
    cancelled_at = time.monotonic()
    if how == "task.cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "asyncio.timeout":
        cancelled_at += 0.05
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await task
    else:
        cancelled_at += 0.05
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, 0.05)
    assert task.cancelled()
    return time.monotonic() - cancelled_at


@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout", "wait_for"])
def test_cancelling_stops_the_run_for_real(app, how, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # One branch at a time: the other two are pending when the cancellation comes.
    config = {"max_concurrency": 1}
    latency = asyncio.run(_cancel_once_started(
        how, lambda: app.ainvoke({"x": 1, "mode": "spin", "marks": str(marks)}, config), marks))
    assert latency < 1.0, f"CancelledError came {latency:.2f}s after the cancellation"
    started = _started(marks)
    assert len(started) == 1, f"pending branches must never start: {started}"
    _, pid, ident = started[0]
    if app.isolation == "process":
        assert not _alive(pid), "the worker of the running branch was killed"
    elif app.isolation == "dask":
        # The worker is restarted through its nanny, which takes a moment.
        assert wait_until(lambda: not _alive(pid), 30), "the Dask worker was restarted"
    else:
        assert "run_branch" not in frames_of(ident), "the branch's thread stopped running it"
    assert not any("run_steps" in frames_of(t.ident) for t in app._run_threads.threads)
    # The graph still works afterwards.
    assert final(asyncio.run(app.ainvoke({"x": 2}))) == expected(2)


def test_cancellation_leaves_no_thread_or_process_behind(isolation):
    from conftest import descendants

    before_threads = {t.ident for t in threading.enumerate()}
    before = descendants()
    compiled = build_graph().compile(isolation=isolation, max_workers=2, lua_timeout=None)

    async def cancelled():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(compiled.ainvoke({"mode": "spin"}), 1.0)

    asyncio.run(cancelled())
    compiled.close()
    assert not [t.name for t in threading.enumerate() if t.ident not in before_threads]
    # Dask's nannies and the process backend's fork server end with close().
    assert wait_until(lambda: not descendants() - before, 10), descendants() - before


def test_cancelling_main_path_lua_stops_it():
    graph = StateGraph()
    graph.add_node("spin", LuaNode("spin", "while true do end"))
    graph.add_edge(START, "spin")
    graph.add_edge("spin", END)
    with graph.compile(isolation="thread", lua_timeout=None) as compiled:
        async def scenario():
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(compiled.ainvoke({}), 0.2)
            return compiled._run_threads.threads

        threads = asyncio.run(scenario())
        assert threads and not any("run_steps" in frames_of(t.ident) for t in threads)


def test_a_cancelled_run_raises_run_cancelled_in_its_thread_and_cancels_async_nodes():
    seen: list[type] = []
    waiting = threading.Event()

    async def forever(state):
        waiting.set()
        try:
            await asyncio.Event().wait()
        except BaseException as exc:
            seen.append(type(exc))
            raise

    graph = StateGraph()
    graph.add_node("wait", forever)
    graph.add_edge(START, "wait")
    graph.add_edge("wait", END)
    with graph.compile(isolation="inline") as compiled:
        cancel = CancelSignal()
        outcome: list[BaseException] = []

        def run():
            try:
                compiled._final_state({}, None, cancel)
            except BaseException as exc:
                outcome.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        assert waiting.wait(10)
        cancel.cancel()
        runner.join(10)
    assert not runner.is_alive()
    assert seen == [asyncio.CancelledError], "the async node was cancelled at its await"
    assert len(outcome) == 1 and isinstance(outcome[0], RunCancelled)
    assert not isinstance(outcome[0], Exception), "checkpoints tell it from a failure"


def test_leaving_astream_early_stops_the_run(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    with build_graph().compile(isolation="thread", max_workers=2, lua_timeout=None) as compiled:
        async def scenario():
            stream = compiled.astream({"mode": "spin", "marks": str(marks)})
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if event["type"] == "node" and event["node"] == "prep":
                        break
            return compiled._run_threads.threads

        threads = asyncio.run(scenario())
        assert not any("run_steps" in frames_of(t.ident) for t in threads)
        for _, _, ident in _started(marks):
            assert "run_branch" not in frames_of(ident)


def test_cancel_signal_callbacks_and_wait():
    signal = CancelSignal()
    heard: list[str] = []
    forget = signal.add_callback(lambda: heard.append("first"))
    signal.add_callback(lambda: heard.append("second"))()  # unregistered at once
    assert not signal.wait(0.01) and not signal.is_set()
    signal.cancel("stop now")
    signal.cancel()
    forget()
    assert heard == ["first"] and signal.wait(0) and signal.is_set()
    signal.add_callback(lambda: heard.append("late"))
    assert heard == ["first", "late"], "a callback added after cancel() runs at once"
    with pytest.raises(RunCancelled, match="stop now"):
        signal.raise_if_set()


# -- aresume -------------------------------------------------------------------


def test_aresume_runs_resume_off_the_loop_with_the_run_signal():
    graph = StateGraph()
    graph.add_node("n", lambda state: None)
    graph.add_edge(START, "n")
    graph.add_edge("n", END)
    with graph.compile(isolation="inline") as compiled:
        calls = []
        loop_thread = threading.get_ident()

        def resume(run_id, *, force=False, _cancel=None):
            calls.append((run_id, force, isinstance(_cancel, CancelSignal),
                          threading.get_ident() != loop_thread))
            return {"resumed": run_id}

        compiled.resume = resume  # stands for the checkpointer's resume()
        assert asyncio.run(compiled.aresume("run-7", force=True)) == {"resumed": "run-7"}
    assert calls == [("run-7", True, True, True)]


def test_a_backend_that_only_returns_lists_stops_before_its_next_chunk(tmp_path, test_backend):
    from isobranch.isolation import run_branch

    class ListsOnly:
        name = "async-lists-only"

        def __init__(self, max_workers=None):
            self.max_workers = max_workers

        def run_branches(self, tasks):
            return [run_branch(task) for task in tasks]

        def close(self):
            pass

    test_backend(ListsOnly.name, ListsOnly)
    marks = tmp_path / "marks"
    marks.mkdir()
    with build_graph().compile(isolation=ListsOnly.name, max_workers=1) as compiled:
        async def scenario():
            task = asyncio.create_task(compiled.ainvoke(
                {"mode": "sleep", "marks": str(marks)}, {"max_concurrency": 1}))
            await _until_marked(marks, task)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
        # The first chunk (one branch, sleeping 0.3 s) runs out; no other starts.
        assert wait_until(lambda: not any("run_steps" in frames_of(t.ident)
                                           for t in compiled._run_threads.threads), 5)
    assert [name for name, _, _ in _started(marks)] == ["b1"]


class _Spinning:
    """The threads that entered a nested Lua loop, and whether each really spins in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entered: list[tuple[int, float]] = []  # (CPU clock of the thread, its time then)

    def enter(self, state: dict) -> None:
        """A node run just before the Lua loop, on the thread that runs it."""
        clock = time.pthread_getcpuclockid(threading.get_ident())
        with self._lock:
            self._entered.append((clock, time.clock_gettime(clock)))

    def spinning(self, count: int) -> bool:
        """``count`` threads entered, each has spent 50 ms of CPU time since (in Lua)."""
        with self._lock:
            entered = list(self._entered)
        return len(entered) >= count and all(
            time.clock_gettime(clock) - then >= 0.05 for clock, then in entered)


def _nested_spin_graph(spinning: _Spinning, extra_branch=None) -> StateGraph:
    """outer -> branch "b", which fans out again to two Lua loops that never end."""
    graph = StateGraph()
    graph.add_node("outer", lambda state: None)
    graph.add_node("b", lambda state: None)
    for name in ("n1", "n2"):
        graph.add_node(f"enter_{name}", spinning.enter)
        graph.add_node(name, LuaNode(name, "while true do end"))
        graph.add_parallel_edge("b", f"enter_{name}", fan_in="inner_join")
        graph.add_edge(f"enter_{name}", name)
    graph.add_fan_in_node("inner_join", lambda state, results: None)
    graph.add_parallel_edge("outer", "b", fan_in="join")
    if extra_branch is not None:
        graph.add_node("other", extra_branch)
        graph.add_parallel_edge("outer", "other", fan_in="join")
    graph.add_fan_in_node("join", lambda state, results: None)
    graph.add_edge(START, "outer")
    graph.add_edge("join", END)
    return graph


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_cancelling_stops_nested_fan_outs_in_branches(isolation, no_thread_leak):
    spinning = _Spinning()
    loops = 1 if isolation == "inline" else 2  # inline runs the nested branches one by one
    with _nested_spin_graph(spinning).compile(isolation=isolation, lua_timeout=None) as compiled:
        async def scenario():
            task = asyncio.create_task(compiled.ainvoke({}))
            while not spinning.spinning(loops):  # cancelled once the nested loops run
                assert not task.done(), "the run ended before its nested loops ran"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(scenario())
    # no_thread_leak: the nested fan-out's own threads (and their Lua loops) end too.


def test_fail_fast_stops_a_siblings_nested_fan_out(no_thread_leak):
    spinning = _Spinning()

    def fails(state):  # once both nested loops of the sibling spin
        assert wait_until(lambda: spinning.spinning(2), 30), "the nested loops never ran"
        raise ValueError("broken")

    graph = _nested_spin_graph(spinning, extra_branch=fails)
    with graph.compile(isolation="thread", lua_timeout=None, fail_fast=True) as compiled, \
            pytest.raises(GraphExecutionError, match="broken"):
        compiled.invoke({})
    # no_thread_leak: the nested fan-out's threads, which spin in Lua, end too.


def test_errors_reach_the_awaiting_caller_as_they_do_in_sync_calls():
    from isobranch import GraphError

    compiled = build_graph().compile(isolation="inline")

    async def scenario():
        with pytest.raises(GraphError, match="unknown key"):
            await compiled.ainvoke({}, {"isolaton": "thread"})
        with pytest.raises(GraphError, match="must be a dict"):
            await compiled.ainvoke([1])
        with pytest.raises(GraphError, match="unknown key"):
            async for _ in compiled.astream({}, {"isolaton": "thread"}):
                pass
        compiled.close()
        with pytest.raises(GraphExecutionError, match="closed"):
            await compiled.ainvoke({})

    asyncio.run(scenario())


@pytest.mark.parametrize("isolation", ["inline", "thread", "process"])
def test_cancelling_at_any_moment_stops_cleanly(isolation):
    """Cancellations at moments spread over a run: before it starts, in a node, in the
    fan-out, at the fan-in. Each call ends at once, nothing keeps running, the graph works."""
    import random

    chooser = random.Random(15)
    with build_graph().compile(isolation=isolation, max_workers=2, lua_timeout=None) as compiled:
        compiled.invoke({})

        async def once(delay: float, mode: str) -> tuple[str, float]:
            task = asyncio.create_task(compiled.ainvoke({"x": 2, "mode": mode}))
            await asyncio.sleep(delay)  # the moment varies on purpose: it is the input here
            task.cancel()
            cancelled_at = time.monotonic()
            try:
                state = await task
            except asyncio.CancelledError:
                return "cancelled", time.monotonic() - cancelled_at
            assert final(state) == expected(2)
            return "finished", time.monotonic() - cancelled_at

        outcomes = set()
        for _ in range(20):
            delay = chooser.choice([0, 0.0005, 0.002, 0.005, 0.02, 0.05])
            outcome, latency = asyncio.run(once(delay, chooser.choice(["quick", "spin"])))
            outcomes.add(outcome)
            assert latency < 1.0
            busy = [t.name for t in threading.enumerate()
                    if {"run_steps", "run_branch"} & set(frames_of(t.ident))]
            assert not busy, f"still running after a cancellation at {delay}s: {busy}"
        assert "cancelled" in outcomes
        assert final(compiled.invoke({"x": 3})) == expected(3)
