"""The package logs through stdlib logging under ``isobranch.*``, in the parent process."""

from __future__ import annotations

import logging
import os
import pickle

import pytest

from conftest import fan_out


def crash(state):
    os._exit(3)


def fine(state):
    return {"fine": True}


def warnings(caplog, logger_prefix):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith(logger_prefix)]


@pytest.mark.usefixtures("no_process_leak")
def test_a_worker_death_logs_a_warning_naming_the_branch(caplog):
    caplog.set_level(logging.DEBUG, logger="isobranch")
    with fan_out(("crash", crash), ("fine", fine)).compile(isolation="process") as app:
        crashed, ok = app.invoke({})["results"]
    assert crashed.error_type == "WorkerCrashed" and ok.success
    (record,) = [r for r in warnings(caplog, "isobranch.isolation.process")
                 if "'crash'" in r.getMessage()]
    assert str(crashed.worker) in record.getMessage() and "exited with code 3" in record.getMessage()


def test_branch_start_and_finish_are_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="isobranch.branch_run")
    with fan_out(("fine", fine)).compile(isolation="inline") as app:
        app.invoke({})
    messages = [r.getMessage() for r in caplog.records
                if r.name == "isobranch.branch_run" and r.levelno == logging.DEBUG]
    assert any("'fine'" in m and "start" in m for m in messages)
    assert any("'fine'" in m and "finished" in m for m in messages)


def test_an_update_that_cannot_be_rebuilt_is_left_out_with_a_debug_record(caplog):
    """A crashed branch's state is rebuilt from its merged updates; one that does not
    unpickle here is swallowed on purpose, and that is logged with its reason."""
    from isobranch.branch import BranchLimits, BranchRun, BranchTask
    from isobranch.isolation.process.branches import Running
    from isobranch.statecopy import StateSnapshot

    caplog.set_level(logging.DEBUG, logger="isobranch")
    task = BranchTask(graph=None, name="b", start="b", fan_in="join", snapshot=StateSnapshot({"a": 1}),
                      limits=BranchLimits(), isolation="process")
    slot = Running(BranchRun(task, 0), b"", worker=None, started=0.0,
                   updates=[b"not a pickle", None, pickle.dumps({"c": 2})])
    assert slot.state_as_of_now() == {"a": 1, "c": 2}
    (record,) = [r for r in caplog.records if r.name == "isobranch.isolation.process.branches"]
    assert record.levelno == logging.DEBUG and "'b'" in record.getMessage()
    assert "cannot be unpickled" in record.getMessage()


def test_a_branch_retry_logs_a_warning_with_attempt_and_reason(caplog):
    from isobranch import RetryPolicy

    def flaky(state):
        raise RuntimeError("not yet")

    caplog.set_level(logging.WARNING, logger="isobranch")
    policy = RetryPolicy(max_attempts=2, initial_interval=0, jitter=False,
                         retry_on=("RuntimeError",))
    with fan_out(("flaky", flaky)).compile(isolation="inline", branch_retry=policy) as app:
        (result,) = app.invoke({})["results"]
    assert not result.success and result.attempts == 2
    (record,) = warnings(caplog, "isobranch.fanout_run")
    assert record.getMessage().startswith(
        "branch 'flaky' failed on attempt 1 of 2 (RuntimeError); retrying in 0s")


def test_a_node_retry_logs_a_warning_with_attempt_and_reason(caplog):
    from isobranch import END, START, RetryPolicy, StateGraph

    calls = []

    def flaky(state):
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionError("reset by peer")
        return {"ok": True}

    graph = StateGraph()
    graph.add_node("fetch", flaky, retry=RetryPolicy(max_attempts=3, initial_interval=0,
                                                     jitter=False))
    graph.add_edge(START, "fetch")
    graph.add_edge("fetch", END)
    caplog.set_level(logging.WARNING, logger="isobranch")
    with graph.compile(isolation="inline") as app:
        assert app.invoke({}) == {"ok": True}
    (record,) = warnings(caplog, "isobranch.runner")
    assert record.getMessage() == (
        "node 'fetch' failed on attempt 1 of 3 (ConnectionError: reset by peer); "
        "retrying in 0s")
