"""The fan-out driver's policies, against a scripted backend that only starts, reports and kills.

Every policy lives in the driver (``fanout_run``); these tests pin each one
with a backend that has none of its own: what is handed out at once, when
a kill is asked for, a kill racing a branch's own finish, backoffs ended
by a stop flag, cancellation, and an empty fan-out.
"""

from __future__ import annotations

import threading
import time

import pytest

from isobranch import RetryPolicy
from isobranch.branch import BranchLimits, BranchTask, ParallelFlowResult, timed_out_result
from isobranch.cancellation import CancelSignal, RunCancelled
from isobranch.fanout_run import RetriesStopped, RetryNotice, drive
from isobranch.isolation import BackendFanOut, BranchRun, IsolationBackend
from isobranch.statecopy import StateSnapshot


def tasks(count: int, branch_timeout: float | None = None) -> list[BranchTask]:
    snapshot = StateSnapshot({})
    limits = BranchLimits(branch_timeout=branch_timeout)
    return [BranchTask(graph=None, name=f"body[{i}]", start="body", fan_in="join", snapshot=snapshot,
                       limits=limits, isolation="scripted", index=i) for i in range(count)]


def succeeded(run: BranchRun) -> ParallelFlowResult:
    return ParallelFlowResult(branch=run.task.name, index=run.task.index, isolation="scripted")


class Scripted(IsolationBackend):
    """Starts every run it is handed at once; a run finishes ``takes[position]`` seconds
    after it started (0 by default), reported one per ``collect``, oldest first."""

    name = "scripted"
    kill_grace_seconds = 0.05

    def __init__(self, *, slots: int = 2, ahead: int = 0, kills: bool = False,
                 takes: dict[int, float] | None = None, report_killed: bool = False,
                 outcome=succeeded) -> None:
        self.slots = slots
        self.tasks_ahead_per_worker = ahead
        self.kills_overdue = kills
        self.takes = takes or {}
        self.report_killed = report_killed
        self.outcome = outcome
        self.opened = 0
        self.collects = 0
        self.most_held = 0
        self.killed: list[tuple[int, float]] = []
        self.closed: list[tuple[bool, list[int]]] = []

    def open(self, source, graph) -> BackendFanOut:
        self.opened += 1
        return ScriptedFanOut(self, source)


class ScriptedFanOut(BackendFanOut):
    def __init__(self, backend: Scripted, source) -> None:
        self.slots = backend.slots
        self.backend = backend
        self.source = source
        self.held: list[BranchRun] = []
        self.killed: list[BranchRun] = []
        self.woken = threading.Event()

    def start(self) -> None:
        while (run := self.source.take()) is not None:
            run.started_at = time.monotonic()
            self.held.append(run)
        self.backend.most_held = max(self.backend.most_held, len(self.held))

    def _due(self, run: BranchRun) -> float:
        return run.started_at + self.backend.takes.get(run.position, 0.0)

    def collect(self, timeout):
        self.backend.collects += 1
        if self.killed:  # a run reported after it was killed: it finished meanwhile
            run = self.killed.pop()
            return [(run, self.backend.outcome(run))]
        now = time.monotonic()
        ready = [run for run in self.held if self._due(run) <= now]
        if not ready:
            soonest = min((self._due(run) - now for run in self.held), default=None)
            waits = [t for t in (timeout, soonest) if t is not None]
            self.woken.wait(min(waits) if waits else None)
            self.woken.clear()
            return []
        self.held.remove(ready[0])
        return [(ready[0], self.backend.outcome(ready[0]))]

    def wake(self) -> None:
        self.woken.set()

    def kill(self, run):
        self.backend.killed.append((run.position, time.monotonic() - run.started_at))
        self.held.remove(run)
        if self.backend.report_killed:
            self.killed.append(run)
        return timed_out_result(run.task, None)

    def close(self, *, cancelled: bool) -> None:
        self.backend.closed.append((cancelled, sorted(run.position for run in self.held)))


@pytest.mark.parametrize(("max_concurrency", "most"), [
    (None, 2 + 3 * 2),  # the slots are the bound: 3 more per slot are taken ahead
    (5, 5 + 3 * 2),
    (1, 1),  # tighter than the slots: nothing is taken ahead
])
def test_the_driver_hands_out_max_concurrency_plus_what_the_backend_takes_ahead(
        max_concurrency, most):
    backend = Scripted(slots=2, ahead=3)
    results = dict(drive(backend, tasks(40), max_concurrency=max_concurrency))
    assert sorted(results) == list(range(40))
    assert backend.most_held == most


def test_an_overdue_branch_is_killed_its_grace_after_its_deadline_and_reported_once():
    # Branch 1 never finishes by itself; once killed, the backend reports it anyway
    # (it finished just as it was killed): the driver keeps the first report only.
    # One at a time, so branch 2 still runs when that late report comes.
    backend = Scripted(kills=True, takes={1: 3600.0}, report_killed=True)
    reported = list(drive(backend, tasks(3, branch_timeout=0.1), max_concurrency=1))
    assert sorted(position for position, _ in reported) == [0, 1, 2]
    results = dict(reported)
    assert results[1].timed_out and results[1].error_type == "BranchTimeout"
    assert results[0].success and results[2].success
    [(position, after)] = backend.killed
    assert position == 1 and after >= 0.1 + backend.kill_grace_seconds


def test_a_backend_that_cannot_kill_is_never_asked_to():
    backend = Scripted(kills=False, takes={1: 0.3})
    results = dict(drive(backend, tasks(3, branch_timeout=0.05)))
    assert backend.killed == [] and all(r.success for r in results.values())


def test_a_stop_flag_ends_a_waiting_backoff_at_once():
    def first_attempt_fails(run):
        if run.attempt == 1:
            return ParallelFlowResult(branch=run.task.name, index=run.task.index, success=False,
                                      error="boom", error_type="OSError")
        return succeeded(run)

    backend = Scripted(outcome=first_attempt_fails)
    closing = CancelSignal()
    policy = RetryPolicy(max_attempts=3, initial_interval=3600, jitter=False,
                         retry_on=["OSError"])
    stream = drive(backend, tasks(1), retry_of=lambda position: policy, stop_flags=[closing])
    assert isinstance(next(stream), RetryNotice)
    started = time.monotonic()
    closing.cancel()  # the graph's close(): the hour-long backoff ends now
    with pytest.raises(RetriesStopped, match=r"branch 'body\[0\]' waited for attempt 2"):
        next(stream)
    assert time.monotonic() - started < 5
    assert backend.closed == [(False, [])]


def test_a_due_retry_waiting_for_room_waits_for_a_result_not_in_a_loop():
    # One slot: branch 0 fails at once and is due again at once, but branch 1 holds
    # the slot for 0.3 s; the driver must wait for its result, not ask again and again.
    def first_attempt_fails(run):
        if run.position == 0 and run.attempt == 1:
            return ParallelFlowResult(branch=run.task.name, index=run.task.index, success=False,
                                      error="boom", error_type="OSError")
        return succeeded(run)

    backend = Scripted(slots=1, takes={1: 0.3}, outcome=first_attempt_fails)
    policy = RetryPolicy(max_attempts=2, initial_interval=0, jitter=False, retry_on=["OSError"])
    items = list(drive(backend, tasks(2), retry_of=lambda position: policy))
    finals = dict(item for item in items if not isinstance(item, RetryNotice))
    assert finals[0].attempts == 2 and finals[1].success
    assert backend.collects < 20, f"{backend.collects} collects for three results"


def test_cancellation_stops_the_fan_out_and_closes_the_backend_as_cancelled():
    backend = Scripted(takes={1: 3600.0, 2: 3600.0})
    cancel = CancelSignal()
    stream = drive(backend, tasks(3), cancel=cancel)
    position, _ = next(stream)
    assert position == 0
    cancel.cancel()
    with pytest.raises(RunCancelled):
        next(stream)
    assert backend.closed == [(True, [1, 2])], "the branches still running are stopped"


def test_an_empty_fan_out_never_opens_its_backend():
    backend = Scripted()
    assert list(drive(backend, [])) == []
    assert backend.opened == 0
