"""Retries: RetryPolicy, node retries, branch retries inside a running fan-out, YAML."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import yaml

from conftest import HAVE_DASK, blocked_in_threading, frames_of, wait_until
from isobranch import (
    END,
    START,
    GraphError,
    GraphExecutionError,
    RetryPolicy,
    StateGraph,
    YAMLEngine,
)
from isobranch.branch import BranchRun
from isobranch.fanout_run import FanOutSource, drive
from isobranch.isolation.adapters import NotReady
from isobranch.isolation.thread import ThreadBackend
from isobranch.progress import FanOutProgress
from isobranch.retry import PROGRAMMING_ERRORS, exception_names, failure_names

IN_PROCESS_AND_PROCESS = ["inline", "thread", "process"]
FAST = {"initial_interval": 0.01, "jitter": False}


# -- the policy ---------------------------------------------------------------------


def test_backoff_grows_by_the_factor_and_stops_at_the_cap():
    policy = RetryPolicy(max_attempts=9, initial_interval=0.5, backoff_factor=2.0,
                         max_interval=3.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_a_backoff_far_past_the_cap_does_not_overflow():
    policy = RetryPolicy(max_attempts=10_000, backoff_factor=1e300, max_interval=7.0,
                         jitter=False)
    assert policy.delay(5_000) == 7.0
    assert RetryPolicy(initial_interval=0, backoff_factor=1e300).delay(9_999) == 0.0


def test_jitter_draws_between_half_the_interval_and_all_of_it():
    policy = RetryPolicy(initial_interval=2.0, backoff_factor=3.0, max_interval=10.0)
    assert policy.delay(2, random=lambda: 0.0) == 3.0
    assert policy.delay(2, random=lambda: 0.5) == 4.5
    assert policy.delay(3, random=lambda: 0.999999) == pytest.approx(10.0)


def test_retry_on_matches_a_class_name_or_the_name_of_a_base():
    class FlakyService(ConnectionResetError):
        pass

    names = failure_names("FlakyService", exception_names(FlakyService))
    assert RetryPolicy(retry_on=["ConnectionError"]).retries(names)
    assert RetryPolicy(retry_on=[OSError]).retries(names)  # classes are taken by name
    assert not RetryPolicy(retry_on=["KeyError"]).retries(names)
    # Engine failures reported by name have their known bases.
    assert RetryPolicy(retry_on=["LuaRuntimeError"]).retries(failure_names("LuaTimeoutError"))


@pytest.mark.parametrize("name", PROGRAMMING_ERRORS)
def test_the_node_default_does_not_retry_programming_errors(name):
    assert not RetryPolicy().retries(failure_names(name))


def test_the_node_default_retries_other_errors_but_not_subclasses_of_programming_errors():
    import json

    assert RetryPolicy().retries(failure_names("TimeoutError", exception_names(TimeoutError)))
    assert RetryPolicy().retries(failure_names("LuaRuntimeError"))
    decode = json.JSONDecodeError
    assert not RetryPolicy().retries(failure_names(decode.__name__, exception_names(decode)))


def test_a_cancelled_branch_is_never_retried():
    assert not RetryPolicy(retry_on=["Cancelled", "Exception"]).retries({"Cancelled"})


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_attempts": 0}, "max_attempts must be an integer >= 1, got 0"),
    ({"max_attempts": 2.5}, "max_attempts must be an integer >= 1"),
    ({"initial_interval": -1}, "initial_interval must be a number of seconds >= 0"),
    ({"max_interval": float("nan")}, "max_interval must be a number of seconds >= 0"),
    ({"backoff_factor": 0.5}, "backoff_factor must be a number >= 1"),
    ({"jitter": "yes"}, "jitter must be true or false"),
    ({"retry_on": ["not a name"]}, "retry_on: 'not a name' is not an exception class"),
])
def test_an_invalid_policy_is_a_value_error_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**fields)


def test_the_feed_hands_a_retry_out_only_when_its_backoff_ended():
    """The driver's source of a fan-out with retries, on an injected clock."""
    now = [100.0]
    source = FanOutSource(iter(["a", "b"]), clock=lambda: now[0])
    first, second = source.take(), source.take()
    assert [(run.task, run.position, run.attempt) for run in (first, second)] == [
        ("a", 0, 1), ("b", 1, 1)]
    assert source.take() is None and not source.finished(), "results are still due"
    source.release(first)
    source.schedule(BranchRun("a", 0, 2), at=102.5)
    assert source.take() is None and source.next_due() == 102.5
    assert not source.ready(), "the retry's backoff has not ended"
    now[0] = 102.5
    assert source.ready()
    retry = source.take()
    assert (retry.task, retry.position, retry.attempt) == ("a", 0, 2)
    source.release(retry)
    source.release(second)
    assert source.take() is None and source.finished()


def test_a_wait_leaves_no_callback_on_its_flags():
    from isobranch.cancellation import CancelSignal
    from isobranch.retry import wait_unless

    flag = CancelSignal()
    assert wait_unless(0.0, [flag]) is False
    assert not flag._callbacks
    caller = threading.get_ident()

    def cancel_once_waiting() -> None:  # set during the wait, not before it
        if wait_until(lambda: "wait_unless" in frames_of(caller)
                      and blocked_in_threading(caller), 30):
            flag.cancel()

    fired = threading.Thread(target=cancel_once_waiting)
    fired.start()
    started = time.monotonic()
    assert wait_unless(60, [flag]) is True
    assert time.monotonic() - started < 5
    fired.join()
    assert not flag._callbacks


# -- node retries -------------------------------------------------------------------


def _chain(fn, retry, *, fan_in=False):
    graph = StateGraph()
    graph.add_node("a", fn, retry=retry)
    graph.add_edge(START, "a")
    graph.add_edge("a", END)
    return graph


def test_a_node_retry_reruns_on_the_same_input_and_never_merges_a_failed_attempt():
    seen = []

    def flaky(state):
        seen.append(dict(state, items=list(state["items"])))
        state["items"].append("touched")  # changes in place on a failed attempt...
        state["junk"] = len(seen)
        if len(seen) < 3:
            raise ConnectionError("service down")
        return {"ok": True}

    with _chain(flaky, RetryPolicy(**FAST)).compile(isolation="inline") as app:
        events = list(app.stream({"items": [1]}))
    final = events[-1]["state"]
    assert seen == [{"items": [1]}] * 3, "every attempt starts from the same input"
    assert final == {"items": [1, "touched"], "junk": 3, "ok": True}, \
        "only the attempt that succeeded counts"
    retries = [e for e in events if e["type"] == "node_retry"]
    assert [(e["node"], e["attempt"], e["max_attempts"], e["error"], e["retry_in"])
            for e in retries] == [("a", 1, 3, "ConnectionError: service down", 0.01),
                                  ("a", 2, 3, "ConnectionError: service down", 0.02)]
    assert [e["type"] for e in events] == ["node_retry", "node_retry", "node", "final"]


def test_a_node_that_fails_every_attempt_says_which_attempt_failed():
    calls = []

    def down(state):
        calls.append(1)
        raise TimeoutError("no answer")

    message = r"node 'a' failed on attempt 3 of 3: TimeoutError: no answer"
    with (_chain(down, RetryPolicy(max_attempts=3, **FAST)).compile() as app,
          pytest.raises(GraphExecutionError, match=message) as info):
        app.invoke({})
    assert len(calls) == 3 and info.value.attempts == 3
    assert info.value.error_bases[:2] == ("OSError", "Exception")


def test_a_node_is_not_retried_for_a_programming_error_by_default():
    calls = []

    def wrong(state):
        calls.append(1)
        return state["missing"]

    with (_chain(wrong, RetryPolicy(**FAST)).compile() as app,
          pytest.raises(GraphExecutionError, match=r"failed on attempt 1 of 3 \(not retried: "
                        r"KeyError is a programming error, retried only if retry_on names it\): "
                        r"KeyError")):
        app.invoke({})
    assert calls == [1]


@pytest.mark.parametrize(("retry_on", "failure", "reason"), [
    (None, ValueError, "ValueError is a programming error, retried only if retry_on names it"),
    (("ConnectionError", "TimeoutError"), KeyError,
     "KeyError is not in retry_on [ConnectionError, TimeoutError]"),
])
def test_a_node_error_not_retried_says_why(retry_on, failure, reason):
    def wrong(state):
        raise failure("no good")

    policy = RetryPolicy(**FAST, retry_on=retry_on)
    with (_chain(wrong, policy).compile(isolation="inline") as app,
          pytest.raises(GraphExecutionError) as info):
        app.invoke({})
    assert str(info.value).startswith(
        f"node 'a' failed on attempt 1 of 3 (not retried: {reason}): {failure.__name__}")


def test_a_failure_on_the_last_attempt_needs_no_reason():
    def down(state):
        raise ValueError("always")

    policy = RetryPolicy(max_attempts=2, **FAST, retry_on=["ValueError"])
    with (_chain(down, policy).compile(isolation="inline") as app,
          pytest.raises(GraphExecutionError) as info):
        app.invoke({})
    assert str(info.value) == "node 'a' failed on attempt 2 of 2: ValueError: always"


@pytest.mark.parametrize(("retry_on", "error_type", "bases", "default", "reason"), [
    (None, "ConnectionError", ["OSError"], None, None),
    (None, "TypeError", ["Exception"], None,
     "TypeError is a programming error, retried only if retry_on names it"),
    (("OSError",), "ConnectionError", ["OSError"], None, None),  # a base is named
    (("OSError",), "KeyError", ["LookupError"], None, "KeyError is not in retry_on [OSError]"),
    (None, "RuntimeError", [], ("WorkerCrashed",),
     "by default only WorkerCrashed are retried; name RuntimeError in retry_on to retry it"),
    (None, "WorkerCrashed", [], ("WorkerCrashed",), None),
    (None, "Cancelled", [], ("WorkerCrashed",),
     "a branch stopped by a sibling or by its run is never retried"),
])
def test_refusal_says_why_a_failure_is_not_retried(retry_on, error_type, bases, default, reason):
    policy = RetryPolicy(retry_on=retry_on)
    names = failure_names(error_type, bases)
    assert policy.refusal(error_type, names, default) == reason
    assert policy.retries(names, default) is (reason is None)


def _flaky_branch_node(state):
    """Fails (OSError) on the first attempt of item 1, as many times as ``fails`` says."""
    marks = os.path.join(state["dir"], f"node-{state['item']}")
    with open(marks, "a") as log:
        log.write("x")
    with open(marks) as log:
        attempt = len(log.read())
    if state["item"] == 1 and attempt <= state.get("fails", 1):
        raise ConnectionResetError(f"flaky on attempt {attempt}")
    return {"value": state["item"] * 10, "attempt": attempt}


def _map(body, *, items=3, node_retry=None, retry=None):
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(items))})
    graph.add_node("body", body, retry=node_retry)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join", retry=retry)
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph


@pytest.mark.parametrize("isolation", IN_PROCESS_AND_PROCESS)
def test_a_node_retry_inside_a_branch_reruns_only_that_node(isolation, tmp_path):
    graph = _map(_flaky_branch_node, node_retry=RetryPolicy(**FAST))
    with graph.compile(isolation=isolation, max_workers=2) as app:
        results = app.invoke({"dir": str(tmp_path)})["results"]
    assert [r.state["value"] for r in results] == [0, 10, 20]
    assert [r.state["attempt"] for r in results] == [1, 2, 1]
    assert [r.attempts for r in results] == [1, 1, 1], "the branch itself ran once"


LUA_RETRY_YAML = """
nodes:
  - name: a
    language: lua
    retry: {max_attempts: 2, initial_interval: 0.01, retry_on: [LuaRuntimeError]}
    run: error("always")
"""


def test_a_lua_node_retry_in_a_lua_only_document():
    engine = YAMLEngine(allow_python=False)
    message = r"node 'a' failed on attempt 2 of 2: LuaRuntimeError:.*always"
    with (engine.load_from_dict(yaml.safe_load(LUA_RETRY_YAML)) as app,
          pytest.raises(GraphExecutionError, match=message)):
        app.invoke({})


def test_a_lua_error_is_not_retried_when_retry_on_names_another_class():
    document = yaml.safe_load(LUA_RETRY_YAML)
    document["nodes"][0]["retry"]["retry_on"] = ["LuaTimeoutError"]
    with (YAMLEngine().load_from_dict(document) as app,
          pytest.raises(GraphExecutionError, match="failed on attempt 1 of 2")):
        app.invoke({})


def _always_down(state):
    raise ConnectionError("down")


def test_a_node_retry_wait_never_outlives_the_branch_timeout(caplog):
    graph = _map(_always_down, items=1,
                 node_retry=RetryPolicy(initial_interval=60, max_interval=60, jitter=False))
    with caplog.at_level(logging.WARNING, logger="isobranch"), \
            graph.compile(isolation="thread", branch_timeout=0.5) as app:
        started = time.monotonic()
        [result] = app.invoke({})["results"]
        elapsed = time.monotonic() - started
    assert result.error_type == "BranchTimeout" and result.timed_out
    assert elapsed < 5, f"a 60 s backoff in a branch with a 0.5 s timeout took {elapsed:.1f}s"
    # The backend gives up on a branch that overruns its deadline (and says so): the
    # backoff must end at the deadline by itself, not be cut short by that.
    abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert not abandoned, abandoned


def test_fail_fast_ends_a_node_retry_wait_in_a_sibling_at_once():
    item_0_failed = threading.Event()
    ran_item_0: list[threading.Thread] = []

    def body(state):
        if state["item"] == 0:
            ran_item_0.append(threading.current_thread())
            item_0_failed.set()
            raise ConnectionError("retried after 60 s")
        # Fails only once item 0 waits in its 60 s backoff.
        assert item_0_failed.wait(30)
        assert wait_until(lambda: blocked_in_threading(ran_item_0[0].ident), 30)
        raise ValueError("not retried")

    graph = _map(body, items=2, node_retry=RetryPolicy(initial_interval=60, max_interval=60,
                                                       jitter=False))
    with graph.compile(isolation="thread", max_workers=2, fail_fast=True) as app:
        started = time.monotonic()
        with pytest.raises(GraphExecutionError, match="fail_fast") as info:
            app.invoke({})
        elapsed = time.monotonic() - started
    assert info.value.error_type == "ValueError", info.value
    assert elapsed < 5, f"fail_fast took {elapsed:.1f}s to end a 60 s backoff"
    # The run raises without waiting for its stopped branches: that item 0's
    # backoff ended shows in its thread, which ends once closing the pool lets it.
    [waiting] = ran_item_0
    waiting.join(5)
    assert not waiting.is_alive(), "item 0 still waits in its 60 s backoff"


# -- branch retries -----------------------------------------------------------------


def _crash_once(state):
    """Item 1's first attempt records its worker and kills it."""
    mark = os.path.join(state["dir"], "crashed")
    if state["item"] == 1 and not os.path.exists(mark):
        with open(mark, "w") as out:
            out.write(str(os.getpid()))
        os._exit(7)
    return {"pid": os.getpid()}


def test_a_branch_whose_worker_crashed_runs_again_on_a_fresh_worker(tmp_path, no_process_leak):
    graph = _map(_crash_once, retry=RetryPolicy(**FAST))
    with graph.compile(isolation="process", max_workers=2) as app:
        events = list(app.stream({"dir": str(tmp_path)}))
    results = events[-1]["state"]["results"]
    crashed_pid = int((tmp_path / "crashed").read_text())
    assert [r.success for r in results] == [True, True, True]
    assert [r.attempts for r in results] == [1, 2, 1]
    assert results[1].state["pid"] != crashed_pid and results[1].worker != crashed_pid
    [retry] = [e for e in events if e["type"] == "branch_retry"]
    assert (retry["branch"], retry["attempt"], retry["max_attempts"]) == ("body[1]", 1, 3)
    assert retry["error_type"] == "WorkerCrashed" and retry["retry_in"] == 0.01
    assert f"worker process {crashed_pid}" in retry["error"]
    finals = [e for e in events if e["type"] == "branch"]
    assert sorted((e["branch"], e["attempts"]) for e in finals) == [
        ("body[0]", 1), ("body[1]", 2), ("body[2]", 1)]
    assert [e["done"] for e in finals] == [1, 2, 3], "a retried attempt is not counted as done"
    assert retry["done"] < 3


def _slow_once(state):
    mark = os.path.join(state["dir"], f"slow-{state['item']}")
    if not os.path.exists(mark):
        open(mark, "w").close()
        time.sleep(2)
    return {"done": True}


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_branch_that_timed_out_is_retried_by_default(isolation, tmp_path):
    graph = _map(_slow_once, items=1, retry=RetryPolicy(**FAST))
    with graph.compile(isolation=isolation, branch_timeout=0.5) as app:
        [result] = app.invoke({"dir": str(tmp_path)})["results"]
    assert result.success and result.attempts == 2


def test_the_branch_default_does_not_retry_a_node_error(tmp_path):
    graph = _map(_flaky_branch_node, retry=RetryPolicy(**FAST))
    with graph.compile(isolation="thread") as app:
        results = app.invoke({"dir": str(tmp_path)})["results"]
    assert not results[1].success and results[1].attempts == 1
    assert results[1].error.startswith(
        "branch 'body[1]' failed on attempt 1 of 3 (not retried: by default only WorkerCrashed, "
        "WorkerDied, BranchTimeout are retried; name ConnectionResetError in retry_on to retry "
        "it): node 'body'")


def test_a_branch_error_outside_retry_on_says_why(tmp_path):
    graph = _map(_flaky_branch_node, retry=RetryPolicy(**FAST, retry_on=["TimeoutError"]))
    with graph.compile(isolation="thread") as app:
        results = app.invoke({"dir": str(tmp_path)})["results"]
    assert results[1].attempts == 1
    assert results[1].error.startswith(
        "branch 'body[1]' failed on attempt 1 of 3 (not retried: ConnectionResetError is not "
        "in retry_on [TimeoutError]): node 'body' in branch 'body[1]' failed: "
        "ConnectionResetError")


class ServiceUnavailable(ConnectionRefusedError):
    """Exists only in this module: a worker reports it by name (and its bases)."""


def _raise_subclass_once(state):
    mark = os.path.join(state["dir"], "raised")
    if not os.path.exists(mark):
        open(mark, "w").close()
        raise ServiceUnavailable("try later")
    return {"ok": True}


def test_branch_retry_on_matches_a_base_of_an_error_raised_in_a_worker(tmp_path):
    graph = _map(_raise_subclass_once, items=1,
                 retry=RetryPolicy(retry_on=["ConnectionError"], **FAST))
    with graph.compile(isolation="process") as app:
        [result] = app.invoke({"dir": str(tmp_path)})["results"]
    assert result.success and result.attempts == 2


def test_a_branch_that_fails_every_attempt_reports_the_last(tmp_path):
    graph = _map(_flaky_branch_node, retry=RetryPolicy(max_attempts=2, retry_on=["OSError"],
                                                       **FAST))
    with (graph.compile(isolation="thread", fail_fast=True) as app,
          pytest.raises(GraphExecutionError) as info):
        app.invoke({"dir": str(tmp_path), "fails": 5})
    assert "branch 'body[1]' failed on attempt 2 of 2: node 'body'" in str(info.value)
    assert "flaky on attempt 2" in str(info.value)
    assert (tmp_path / "node-1").read_text() == "xx"


def test_fail_fast_waits_for_the_last_attempt(tmp_path):
    graph = _map(_flaky_branch_node, retry=RetryPolicy(retry_on=["OSError"], **FAST))
    with graph.compile(isolation="thread", fail_fast=True) as app:
        results = app.invoke({"dir": str(tmp_path)})["results"]
    assert [r.success for r in results] == [True, True, True]
    assert results[1].attempts == 2


def _first_attempt_of_item_0_fails(state):
    mark = os.path.join(state["dir"], f"ran-{state['item']}")
    first = not os.path.exists(mark)
    open(mark, "a").close()
    if state["item"] == 0 and first:
        raise ConnectionError("first attempt")
    return {"at": time.monotonic()}


@pytest.mark.parametrize("isolation", IN_PROCESS_AND_PROCESS)
def test_a_backoff_holds_no_worker_and_delays_no_sibling(isolation, tmp_path):
    """One worker: while item 0 waits 1 s to be retried, items 1 and 2 run on it."""
    graph = _map(_first_attempt_of_item_0_fails,
                 retry=RetryPolicy(initial_interval=1.0, jitter=False, retry_on=["OSError"]))
    with graph.compile(isolation=isolation, max_workers=1) as app:
        events = [e for e in app.stream({"dir": str(tmp_path)})
                  if e["type"] in ("branch", "branch_retry")]
    assert [(e["type"], e["branch"]) for e in events] == [
        ("branch_retry", "body[0]"), ("branch", "body[1]"), ("branch", "body[2]"),
        ("branch", "body[0]")]
    assert events[-1]["attempts"] == 2 and events[-1]["success"]


def _fail_item_0(state):
    if state["item"] == 0:
        raise ConnectionError("retried in 60 s")
    return {}


def _wait_in_a_long_backoff(app, stop):
    """Run ``app`` until item 0 waits in its 60 s backoff, call ``stop``; seconds it took."""
    events = app.stream({})
    for event in events:
        if event["type"] == "branch_retry":
            break
    started = time.monotonic()
    try:
        stop(events)
    finally:
        events.close()
    return time.monotonic() - started


LONG = RetryPolicy(initial_interval=60, jitter=False, retry_on=["OSError"])


@pytest.mark.parametrize("isolation", IN_PROCESS_AND_PROCESS)
def test_close_ends_a_long_backoff_at_once(isolation, no_process_leak):
    app = _map(_fail_item_0, items=1, retry=LONG).compile(isolation=isolation)
    closer = threading.Timer(0.2, app.close)

    def close_from_another_thread(events):
        closer.start()
        with pytest.raises(GraphExecutionError, match=r"waited for attempt 2"):
            list(events)

    assert _wait_in_a_long_backoff(app, close_from_another_thread) < 2
    closer.join()  # close() itself goes on releasing the pools after the run ended


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_ctrl_c_ends_a_long_backoff_at_once(isolation, no_process_leak):
    assert threading.current_thread() is threading.main_thread()
    main = threading.main_thread().ident

    def press_ctrl_c(events):
        threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            list(events)

    with _map(_fail_item_0, items=1, retry=LONG).compile(isolation=isolation) as app:
        assert _wait_in_a_long_backoff(app, press_ctrl_c) < 2


def test_a_consumer_that_stops_reading_ends_a_backoff_at_once():
    with _map(_fail_item_0, items=1, retry=LONG).compile(isolation="thread") as app:
        assert _wait_in_a_long_backoff(app, lambda events: None) < 2


def test_fail_fast_ends_a_sibling_backoff_at_once():
    retry_scheduled = threading.Event()

    def body(state):
        if state["item"] == 0:
            raise ConnectionError("retried in 60 s")
        assert retry_scheduled.wait(30), "item 0's retry was never scheduled"
        raise ValueError("final")

    with _map(body, items=2, retry=LONG).compile(isolation="thread", max_workers=2,
                                                  fail_fast=True) as app:
        events = app.stream({})
        with pytest.raises(GraphExecutionError, match="fail_fast") as info:
            for event in events:
                if event["type"] == "branch_retry":  # item 0 now waits 30 s for attempt 2
                    assert event["branch"] == "body[0]"
                    failing = time.monotonic()
                    retry_scheduled.set()  # item 1 fails only now
    assert time.monotonic() - failing < 5, "fail_fast waited for a sibling's backoff"
    assert [r.error_type for r in info.value.results] == ["Cancelled", "ValueError"]


def test_retry_on_a_parallel_edge_applies_to_that_branch_only(tmp_path):
    calls = {"a": 0, "b": 0}

    def branch(name):
        def run(state):
            calls[name] += 1
            raise ConnectionError(name)
        return run

    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("a", branch("a"))
    graph.add_node("b", branch("b"))
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_parallel_edge("start", "a", fan_in="join",
                            retry={"max_attempts": 2, "retry_on": ["OSError"],
                                   "initial_interval": 0})
    graph.add_parallel_edge("start", "b", fan_in="join")
    graph.add_edge("a", "join")
    graph.add_edge("b", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="thread") as app:
        results = app.invoke({})["results"]
    assert calls == {"a": 2, "b": 1}
    assert [r.attempts for r in results] == [2, 1]


def test_compile_branch_retry_is_the_default_of_every_fan_out(tmp_path):
    graph = _map(_flaky_branch_node)
    with graph.compile(isolation="thread",
                       branch_retry=RetryPolicy(retry_on=["OSError"], **FAST)) as app:
        assert app.invoke({"dir": str(tmp_path)})["results"][1].attempts == 2
        with pytest.raises(GraphError, match="branch_retry"):
            app.invoke({}, config={"branch_retry": {"max_attempts": -1}})


class _StreamsButKnowsNoNotReady:
    """A third-party backend with its own stream_branches that takes finite sources only."""

    name = "finite-stream"

    def __init__(self, max_workers=None):
        self._inner = ThreadBackend(max_workers=max_workers)

    def stream_branches(self, tasks, *, max_concurrency=None):
        def checked():
            for task in tasks:
                assert not isinstance(task, NotReady), "a backend that did not ask for it"
                yield task
        return drive(self._inner, checked(), max_concurrency=max_concurrency)

    def run_branches(self, tasks):
        return [result for _, result in sorted(drive(self._inner, tasks),
                                               key=lambda pair: pair[0])]

    def close(self):
        self._inner.close()


class _ListsOnly:
    name = "lists-only"

    def __init__(self, max_workers=None):
        self._inner = ThreadBackend(max_workers=max_workers)

    def run_branches(self, tasks):
        return [result for _, result in sorted(drive(self._inner, tasks),
                                               key=lambda pair: pair[0])]

    def close(self):
        self._inner.close()


@pytest.mark.parametrize("backend", [_StreamsButKnowsNoNotReady, _ListsOnly])
def test_branch_retries_work_on_a_third_party_backend(backend, tmp_path, test_backend):
    test_backend(backend.name, backend)
    graph = _map(_flaky_branch_node, items=4, retry=RetryPolicy(retry_on=["OSError"], **FAST))
    with graph.compile(isolation=backend.name, max_workers=2) as app:
        results = app.invoke({"dir": str(tmp_path), "fails": 2})["results"]
    assert [r.attempts for r in results] == [1, 3, 1, 1]
    assert [r.state["value"] for r in results] == [0, 10, 20, 30]


@pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed")
def test_a_branch_retry_on_dask(tmp_path):
    graph = _map(_flaky_branch_node, retry=RetryPolicy(retry_on=["OSError"], **FAST))
    with graph.compile(isolation="dask", max_workers=2) as app:
        results = app.invoke({"dir": str(tmp_path)})["results"]
    assert [r.attempts for r in results] == [1, 2, 1]
    assert [r.state["value"] for r in results] == [0, 10, 20]


# -- events and progress ------------------------------------------------------------


def test_progress_counts_a_branch_once_however_often_it_ran():
    progress = FanOutProgress(stream=open(os.devnull, "w"))  # noqa: SIM115
    common = {"fan_out": "start", "fan_in": "join", "total": 2, "index": 0}
    progress.update({**common, "type": "branch_retry", "branch": "b[0]", "attempt": 1,
                     "done": 0})
    progress.update({**common, "type": "branch", "branch": "b[1]", "success": True,
                     "attempts": 1, "done": 1})
    progress.update({**common, "type": "branch", "branch": "b[0]", "success": True,
                     "attempts": 2, "done": 2})
    bar, _ = progress._bars["join"]
    assert bar.n == 2
    assert "retried=1" in bar.postfix
    progress.close()
    progress.stream.close()


# -- YAML ---------------------------------------------------------------------------


MAP_YAML = """
settings:
  parallel: {isolation: thread, retry: {max_attempts: 4, retry_on: [OSError]}}
nodes:
  - {name: start, run: 'return {"items": [1, 2]}'}
  - {name: body, run: 'return {}'}
  - {name: join, fan_in: true, run: 'return {}'}
edges:
  - {from: start, to: body, type: map, over: items, fan_in: join}
  - {from: body, to: join}
"""


def _problems(document):
    return YAMLEngine().validate_dict(document)


def test_settings_parallel_retry_is_the_branch_retry_default():
    with YAMLEngine().load_from_dict(yaml.safe_load(MAP_YAML)) as app:
        assert app.branch_retry == RetryPolicy(max_attempts=4, retry_on=("OSError",))


@pytest.mark.parametrize(("path", "value", "message"), [
    (("settings", "parallel", "retry"), {"max_attemps": 2},
     "settings.parallel.retry.max_attemps: unknown key (allowed: backoff_factor, "
     "initial_interval, jitter, max_attempts, max_interval, retry_on); "
     "did you mean 'max_attempts'?"),
    (("settings", "parallel", "retry"), {"max_attempts": "three"},
     "settings.parallel.retry.max_attempts must be an integer >= 1, got 'three'"),
    (("nodes", 1, "retry"), {"initial_interval": -2},
     "node 'body': retry.initial_interval must be a number of seconds >= 0, got -2"),
    (("nodes", 1, "retry"), {"retry_on": "ConnectionError, KeyError"},
     "node 'body': retry.retry_on: must be a list of exception class names"),
    (("nodes", 1, "retry"), "always",
     "node 'body': retry: must be a mapping of backoff_factor"),
    (("edges", 0, "retry"), {"jitter": "no"},
     "edges[0] (start -> body): retry.jitter must be true or false, got 'no'"),
    (("edges", 0, "retry"), {"backof_factor": 2},
     "edges[0] (start -> body): retry.backof_factor: unknown key"),
    (("edges", 1, "retry"), 3,
     "edges[1] (body -> join): 'retry' belongs to parallel and map edges"),
])
def test_every_retry_key_is_validated_naming_its_place(path, value, message):
    document = yaml.safe_load(MAP_YAML)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = _problems(document)
    assert any(message in problem for problem in problems), problems


def test_a_number_is_short_for_max_attempts_in_yaml():
    document = yaml.safe_load(MAP_YAML)
    document["nodes"][0]["retry"] = True
    document["nodes"][1]["retry"] = 5
    document["edges"][0]["retry"] = {"max_attempts": 2, "jitter": False}
    with YAMLEngine().load_from_dict(document) as app:
        assert app.node_retries["body"].max_attempts == 5
        assert app.node_retries["start"] == RetryPolicy()
        assert app.fan_out_of("start").retry == RetryPolicy(max_attempts=2, jitter=False)


def test_a_yaml_parallel_edge_retry_reaches_its_branch(tmp_path):
    document = {
        "nodes": [{"name": "start", "run": "return None"},
                  {"name": "a", "run": "raise ConnectionError('a')"},
                  {"name": "join", "fan_in": True,
                   "run": "return {'attempts': [r.attempts for r in parallel_results]}"}],
        "edges": [{"from": "start", "to": "a", "type": "parallel", "fan_in": "join",
                   "retry": {"max_attempts": 3, "initial_interval": 0,
                             "retry_on": ["ConnectionError"]}},
                  {"from": "a", "to": "join"}],
    }
    with YAMLEngine(isolation="inline").load_from_dict(document) as app:
        assert app.invoke({})["attempts"] == [3]


def _fails_item_mod_3_times(state):
    mark = os.path.join(state["dir"], f"n-{state['item']}")
    with open(mark, "a") as log:
        log.write("x")
    with open(mark) as log:
        attempt = len(log.read())
    if attempt <= state["item"] % 3:
        if state["item"] % 2:
            raise ConnectionError(f"attempt {attempt}")
        if state["crash"]:
            os._exit(5)
        time.sleep(0.3)  # past the 0.15 s branch_timeout
    return {"attempt": attempt}


@pytest.mark.parametrize("isolation", IN_PROCESS_AND_PROCESS)
def test_many_branches_retried_at_once_are_each_reported_once(isolation, tmp_path):
    """Item i fails its first i % 3 attempts (an error, a crash or a timeout)."""
    graph = _map(_fails_item_mod_3_times, items=30,
                 retry=RetryPolicy(initial_interval=0.001, backoff_factor=1.5,
                                   retry_on=["ConnectionError", "WorkerCrashed",
                                             "BranchTimeout"]))
    crash = isolation == "process"
    with graph.compile(isolation=isolation, max_workers=2, branch_timeout=0.15) as app:
        events = list(app.stream({"dir": str(tmp_path), "crash": crash}))
    results = events[-1]["state"]["results"]
    assert [r.attempts for r in results] == [i % 3 + 1 for i in range(30)]
    assert all(r.success and r.state["attempt"] == r.attempts for r in results)
    finals = [e for e in events if e["type"] == "branch"]
    assert sorted(e["index"] for e in finals) == list(range(30))
    assert [e["done"] for e in finals] == list(range(1, 31))
    assert len([e for e in events if e["type"] == "branch_retry"]) == sum(i % 3 for i in range(30))


def test_a_lua_fan_in_node_sees_each_branch_s_attempts(tmp_path):
    from isobranch.nodes import LuaNode

    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": [0, 1, 2]})
    graph.add_node("body", _flaky_branch_node)
    graph.add_fan_in_node("join", LuaNode("join", """
        local attempts = {}
        for i, r in ipairs(state.parallel_results) do attempts[i] = r.attempts end
        return {attempts = attempts}"""))
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join",
                       retry=RetryPolicy(retry_on=["OSError"], **FAST))
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    with graph.compile(isolation="thread") as app:
        assert app.invoke({"dir": str(tmp_path)})["attempts"] == [1, 2, 1]


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_cancelling_an_async_run_ends_a_long_backoff_at_once(isolation, no_process_leak):
    import asyncio

    async def main(app):
        events = app.astream({})
        async for event in events:
            if event["type"] == "branch_retry":
                break
        started = time.monotonic()
        task = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await events.aclose()
        return time.monotonic() - started

    with _map(_fail_item_0, items=1, retry=LONG).compile(isolation=isolation) as app:
        assert asyncio.run(main(app)) < 2
