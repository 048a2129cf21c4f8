"""Running one branch: ``run_branch``, the same function on every backend.

Only the place it runs differs (the caller's thread, a pool thread, a worker
process, a Dask worker). A branch gets a private deep copy of the state and
a private execution context (fresh Lua VM, created lazily), runs the step
loop (runner.py) from its first node until it reaches the fan-in node or
END, and always returns a ``ParallelFlowResult``: failures are data, not
exceptions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    Watchdog,
    cancelled_result,
    format_traceback,
    ms_since,
    result_name,
    route_step,
)
from .context import ExecutionContext
from .error_kinds import ErrorKind
from .errors import BranchCancelled, BranchTimeout, GraphExecutionError, NodePaused
from .interrupts import enter_site, leave_site
from .isolation.registry import create_backend
from .retry import exception_names
from .runner import run_steps
from .trace_records import SpanRecorder

logger = logging.getLogger(__name__)


def run_branch(task: BranchTask, monitor: BranchMonitor | None = None,
               watchdog: Watchdog | None = None) -> ParallelFlowResult:
    """Run one branch to its fan-in node (or END) and describe the outcome.

    ``monitor`` lets an in-process backend watch and cancel the branch;
    ``watchdog`` is told the branch's progress and Lua deadlines by a branch
    running in a worker process (whose Lua then runs without a hook).
    """
    started = time.monotonic()
    debug = logger.isEnabledFor(logging.DEBUG)  # one check: branches can be 0.07 ms each
    if debug:
        logger.debug("branch %r started at node %r (%s)", task.name, task.start,
                     task.isolation)
    if monitor is not None:
        monitor.started_at = started
    limits = task.limits
    time_limit = limits.branch_timeout
    state: dict = {}
    route: list[Any] = list(task.route)  # a resumed branch: what it ran before its pause
    context = ExecutionContext(
        task.graph, deadline=started + time_limit if time_limit else None,
        time_limit=time_limit, branch_name=task.name, branch_index=task.index,
        monitor=monitor, fan_out_limits=limits, watchdog=watchdog, stop=task.stop,
        nested_isolation="inline" if task.isolation == "inline" else "thread",
        backend_factory=create_backend)
    context.branch_start = task.start
    # Only a task sent under a traced fan-out records spans (sent back in the result).
    recorder = None
    if task.trace is not None:
        recorder = context.spans = SpanRecorder(
            task.trace, graph=task.graph.name, branch=task.name, index=task.index,
            isolation=task.isolation)
    # Each attempt records on a tape of its own; what it recorded goes back in its result.
    if task.replay is not None:
        context.replay = task.replay.for_branch()
    # interrupt() in any of the branch's nodes finds it through its context (set once
    # per branch, not per node call).
    site = enter_site(context)
    context.is_running_site = True
    try:
        state = task.initial_state()
        if monitor is not None:
            monitor.state = state
        for event in run_steps(task.graph, state, context, start=task.start,
                               stop_at=task.fan_in, resume=task.resume_at):
            kind = event["type"]
            if kind == "node":
                route.append(event["node"])
            elif kind == "parallel":
                route.append(route_step(event["branches"]))
        # A last node that ran past the deadline makes the branch late too.
        if context.deadline is not None:
            context.check_deadline()
        outcome: dict[str, Any] = {"reducer_writes": context.reducer_writes}
    except NodePaused as paused:
        # Neither a success nor a failure: the branch waits for answers, and a resume
        # continues it from ``resume_at`` on the state it has now.
        if debug:
            logger.debug("branch %r paused: %s", task.name, paused)
        outcome = dict(success=False, error=f"branch {task.name!r} paused for answers: {paused}",
                       error_type=ErrorKind.INTERRUPTED, node=paused.interrupts[0].node,
                       interrupts=tuple(paused.interrupts), resume_at=paused.point)
    except BranchTimeout as timeout:
        outcome = dict(success=False, error=str(timeout), error_type=ErrorKind.BRANCH_TIMEOUT,
                       timed_out=True, node=timeout.node, traceback=format_traceback(timeout))
    except BranchCancelled as cancelled:
        if debug:
            logger.debug("branch %r finished: cancelled (%s)", task.name, cancelled)
        return cancelled_result(task, str(cancelled))
    except GraphExecutionError as exc:  # a node failed, or a nested fan-out under fail_fast
        if exc.state is not None:
            state = exc.state
        outcome = dict(success=False, error=str(exc),
                       error_type=exc.error_type or type(exc).__name__,
                       timed_out=exc.timed_out, node=exc.node,
                       traceback=exc.traceback or format_traceback(exc),
                       error_bases=tuple(getattr(exc, "error_bases", ()) or ()))
    except Exception as exc:  # a branch must never take its siblings down
        outcome = dict(success=False,
                       error=f"branch {task.name!r}: {type(exc).__name__}: {exc}",
                       error_type=type(exc).__name__, traceback=format_traceback(exc),
                       error_bases=exception_names(type(exc)))
    finally:
        leave_site(site)
        context.close()
    done = ParallelFlowResult(branch=result_name(task.start, task.index), index=task.index,
                              state=state, route=tuple(route), duration_ms=ms_since(started),
                              isolation=task.isolation, worker=_worker_name(task.isolation),
                              **outcome)
    if recorder is not None:
        done.spans = recorder.finish(done)
    if context.replay is not None and context.replay.new:
        done.recordings = context.replay.new
    if debug:
        logger.debug("branch %r finished in %.1f ms: %s", task.name, done.duration_ms,
                     "success" if done.success else f"failed ({done.error_type})")
    return done


def _worker_name(isolation: str) -> str | int:
    if isolation in ("inline", "thread"):
        return threading.current_thread().name
    return os.getpid()
