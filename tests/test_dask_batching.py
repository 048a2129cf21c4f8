"""The Dask backend's batches: short branches run many per task, yet each branch keeps
its own result, deadline, concurrency count, crash and event.

Every cluster here is a LocalCluster on 127.0.0.1 with ports the OS picks: a
user's cluster given by address (module-scoped, for tests that break no
worker), or the local cluster isobranch starts (for those that kill one).
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import sqlite3
import time

import pytest

from conftest import HAVE_DASK, module_dask_cluster, wait_until
from isobranch import END, START, GraphExecutionError, SqliteCheckpointer, StateGraph

pytestmark = [
    pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed: "
                       "pip install -e '.[test,dask]'"),
    pytest.mark.usefixtures("no_process_leak_beside_the_cluster"),
]


@pytest.fixture(scope="module")
def cluster():
    """A user's cluster: default scheduler settings, 2 workers of 2 threads each."""
    with module_dask_cluster(threads_per_worker=2) as local:
        yield local


def map_graph(body, **options):
    """start -> one branch per item of ``state["items"]`` running ``body`` -> join (which
    keeps every result as ``results``)."""
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("body", body)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph.compile(isolation="dask", **options)


def counted(directory: pathlib.Path, then=None):
    """A branch body that appends its worker's pid to ``directory/<item>`` (one line per
    run), then does ``then(item)``; it returns the item plus one."""
    where = str(directory)

    def body(state):
        item = state["item"]
        with open(os.path.join(where, str(item)), "a") as marks:
            marks.write(f"{os.getpid()}\n")
        if then is not None:
            then(item)
        return {"value": item + 1}

    return body


def runs(directory: pathlib.Path, item: int) -> list[int]:
    """The pids of every run of ``item``, in order."""
    path = directory / str(item)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def scheduler_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def test_a_map_of_short_branches_runs_in_far_fewer_tasks_than_branches(cluster, tmp_path):
    from distributed import Client, get_task_stream

    items = list(range(2000))
    with Client(cluster, set_as_default=False) as client, \
            map_graph(lambda state: {"value": state["item"] + 1}, client=client) as app, \
            get_task_stream(client) as stream:
        results = app.invoke({"items": items})["results"]
    assert [r.state["value"] for r in results] == [i + 1 for i in items]
    assert all(r.success and r.isolation == "dask" for r in results)
    keys = [str(task["key"]) for task in stream.data]
    assert any(key.startswith("isobranch-batch-") for key in keys)
    assert len(keys) < len(items) / 10, f"{len(keys)} Dask tasks for {len(items)} branches"


def test_a_crash_in_a_batch_fails_only_its_item_and_no_branch_runs_after_its_success(
        tmp_path):
    # A batch's results die with its worker, so its branches run again (alone, where the
    # one that kills its worker is named); a branch runs again only while no success of
    # it has been reported, and none is lost.
    crasher = 300
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()

    def crash(item):
        if item == crasher:
            os._exit(7)

    items = list(range(400))
    runs_at_success: dict[int, int] = {}
    with map_graph(counted(marks_dir, crash), max_workers=2) as app:
        for event in app.stream({"items": items}):
            if event["type"] == "branch" and event["success"]:
                runs_at_success[event["index"]] = len(runs(marks_dir, event["index"]))
            if event["type"] == "final":
                results = event["state"]["results"]
    failed = [r for r in results if not r.success]
    assert [r.index for r in failed] == [crasher], [(r.index, r.error) for r in failed]
    assert failed[0].error_type == "WorkerDied" and "died while running it" in failed[0].error
    assert [r.state["value"] for r in results if r.success] == \
        [i + 1 for i in items if i != crasher]
    assert len(runs(marks_dir, crasher)) == 2, "once in its batch, once alone"
    ran_after_success = {i: (at_success, len(runs(marks_dir, i)))
                         for i, at_success in runs_at_success.items()
                         if len(runs(marks_dir, i)) != at_success}
    assert ran_after_success == {}, "(runs at its success, runs in all) of each branch"
    assert max(runs_at_success.values()) <= 3


def computed_again(key: str, dead: str, dask_scheduler=None) -> bool:
    """On the scheduler: whether ``key`` was computed again after worker ``dead`` died
    holding its result (in memory elsewhere), or is gone."""
    task = dask_scheduler.tasks.get(key)
    return task is None or task.state == "erred" or (
        task.state == "memory" and dead not in {ws.address for ws in task.who_has})


def test_a_batch_whose_results_were_taken_runs_nothing_when_its_worker_dies_before_letting_go(
        tmp_path, monkeypatch):
    # The race made certain: the client has taken a batch's results and still holds its
    # future (it lets go after reporting them) when the worker holding them dies, and
    # the scheduler computes the batch again before the client reports anything. That
    # run must run none of the batch's branches: they would run after their success.
    from isobranch.isolation.dask import DaskBackend

    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()
    fetch = DaskBackend._fetch
    taken: dict[str, list[int]] = {}

    def fetch_then_kill_the_holder(self, client, futures):
        values = fetch(self, client, futures)
        if values is None or taken:
            return values
        for future, value in zip(futures, values, strict=True):
            if not (str(future.key).startswith("isobranch-batch-")
                    and isinstance(value, tuple)):
                continue
            holder = next(iter(client.who_has([future])[future.key]))
            os.kill(client.run(os.getpid, workers=[holder])[holder], signal.SIGKILL)
            key = future.key
            taken[key] = [result.index for result in value[0]]
            assert wait_until(functools.partial(client.run_on_scheduler, computed_again, key,
                                                holder)), "the scheduler did not compute it again"
            break
        return values

    monkeypatch.setattr(DaskBackend, "_fetch", fetch_then_kill_the_holder)
    items = list(range(300))
    with map_graph(counted(marks_dir), max_workers=2) as app:
        results = app.invoke({"items": items})["results"]
    assert taken, "no batch's results were taken"
    assert [r.error for r in results if not r.success] == []
    assert [r.state["value"] for r in results] == [i + 1 for i in items]
    (batch,) = taken.values()
    assert {i: len(runs(marks_dir, i)) for i in batch} == {i: 1 for i in batch}


def test_a_task_claimed_by_an_earlier_run_runs_nothing(cluster):
    # Two runs of one key race for its claim on the scheduler: exactly one wins, every
    # later one loses, and letting go of the claim leaves the scheduler nothing.
    from distributed import Client

    from isobranch.isolation.dask_worker import claim_first_run

    def claim_twice(key):
        from distributed import get_worker

        worker = get_worker()
        return claim_first_run(worker, key), claim_first_run(worker, key)

    def held(dask_scheduler=None):
        return {name: users for name, users in
                dask_scheduler.extensions["multi_locks"].locks.items() if users}

    with Client(cluster, set_as_default=False) as client:
        first, second = client.submit(claim_twice, "isobranch-claim-test", pure=False).result()
        assert first is not None and first.startswith("isobranch-claim-test@")
        assert second is None
        assert client.run_on_scheduler(held) == {"isobranch-claim-test": [first]}
        client.sync(client.scheduler.multi_lock_release, id=first)
        assert client.run_on_scheduler(held) == {}


def claims_held(dask_scheduler=None) -> list[str]:
    """On the scheduler: the task claims held (``dask_worker.claim_first_run``)."""
    return [name for name, users in dask_scheduler.extensions["multi_locks"].locks.items()
            if users and name.startswith("isobranch-")]


def test_a_fan_out_lets_go_of_its_task_claims_when_it_ends(cluster):
    from distributed import Client

    items = list(range(300))
    seen_during: list[list[str]] = []

    def body(state):
        return {"value": state["item"] + 1}

    with Client(cluster, set_as_default=False) as client, \
            map_graph(body, client=client) as app:
        for event in app.stream({"items": items}):
            if event["type"] == "branch" and event["done"] == len(items) // 2:
                seen_during.append(client.run_on_scheduler(claims_held))
        assert seen_during and seen_during[0], "no task claimed while the map ran"
        assert wait_until(lambda: client.run_on_scheduler(claims_held) == [])


def test_each_branch_of_a_batch_counts_its_deadline_from_its_own_start(cluster):
    # Short branches grow the batches; then slow ones (each well inside the timeout)
    # share batches whose whole run is far past it (and past its grace of a second).
    slow = set(range(400, 430))

    def body(state):
        if state["item"] in slow:
            time.sleep(0.2)
        return {"value": state["item"] + 1}

    items = list(range(1000))
    with map_graph(body, dask_address=cluster.scheduler_address, branch_timeout=0.5) as app:
        results = app.invoke({"items": items})["results"]
    assert [r.error for r in results if not r.success] == []
    assert [r.state["value"] for r in results] == [i + 1 for i in items]


def test_a_branch_stuck_in_a_batch_times_out_alone_and_its_batch_mates_finish(tmp_path):
    stuck = 250
    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()

    def hang(item):
        if item == stuck:
            time.sleep(120)

    items = list(range(320))
    with map_graph(counted(marks_dir, hang), max_workers=2, branch_timeout=1.0) as app:
        begin = time.monotonic()
        results = app.invoke({"items": items})["results"]
        assert time.monotonic() - begin < 60
    failed = [r for r in results if not r.success]
    assert [r.index for r in failed] == [stuck]
    assert failed[0].timed_out and failed[0].error_type == "BranchTimeout"
    assert "in node 'body'" in failed[0].error and "is being restarted" in failed[0].error
    assert [r.state["value"] for r in results if r.success] == [i + 1 for i in items
                                                                if i != stuck]
    assert len(runs(marks_dir, stuck)) == 1
    assert all(1 <= len(runs(marks_dir, i)) <= 2 for i in items)


def test_max_concurrency_counts_branches_not_tasks(cluster, tmp_path):
    # The cluster runs 4 branches at once; the fan-out allows 3.
    spans = tmp_path / "spans"
    spans.mkdir()
    where = str(spans)

    def body(state):
        began = time.time()
        time.sleep(0.05)
        with open(os.path.join(where, str(state["item"])), "w") as out:
            out.write(f"{began} {time.time()}")
        return {"value": state["item"] + 1}

    items = list(range(60))
    with map_graph(body, dask_address=cluster.scheduler_address, max_concurrency=3) as app:
        results = app.invoke({"items": items})["results"]
    assert all(r.success for r in results)
    intervals = [tuple(map(float, (spans / str(i)).read_text().split())) for i in items]
    edges = sorted([(began, 1) for began, _ in intervals] + [(ended, -1) for _, ended in intervals],
                   key=lambda edge: (edge[0], edge[1]))
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    assert most <= 3


def test_fail_fast_cancels_the_queued_batches(cluster, tmp_path):
    from distributed import Client

    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()

    def fail_early(item):
        if item == 40:
            raise RuntimeError("item 40 failed")
        time.sleep(0.005)

    items = list(range(3000))
    with Client(cluster, set_as_default=False) as client:
        with map_graph(counted(marks_dir, fail_early), client=client, fail_fast=True) as app, \
                pytest.raises(GraphExecutionError, match="item 40 failed"):
            app.invoke({"items": items})
        # A user's cluster keeps running what was not cancelled: wait until it is idle.
        assert wait_until(lambda: client.run_on_scheduler(scheduler_tasks) == 0)
    ran = sum(1 for item in items if runs(marks_dir, item))
    assert ran < len(items) / 2, f"{ran} of {len(items)} branches ran after fail_fast"


def test_fail_fast_cancels_the_submitted_tasks_that_have_not_started(cluster, tmp_path):
    # Slow branches go one per task, four tasks per worker thread submitted: the one
    # that fails at once leaves twelve waiting at the scheduler, which never run.
    from distributed import Client

    marks_dir = tmp_path / "marks"
    marks_dir.mkdir()

    def fail_first(item):
        if item == 0:
            raise RuntimeError("item 0 failed")
        time.sleep(1.0)

    items = list(range(40))
    with Client(cluster, set_as_default=False) as client:
        with map_graph(counted(marks_dir, fail_first), client=client, fail_fast=True) as app, \
                pytest.raises(GraphExecutionError, match="item 0 failed"):
            app.invoke({"items": items})
        assert wait_until(lambda: client.run_on_scheduler(scheduler_tasks) == 0)
    ran = [item for item in items if runs(marks_dir, item)]
    # The four threads' first branches, and at most one more each as item 0's
    # thread freed up before the driver heard of the failure.
    assert len(ran) <= 8, f"{len(ran)} branches ran: {ran}"


def test_every_branch_of_a_batched_map_is_an_event_and_a_checkpoint(cluster, tmp_path):
    items = list(range(500))
    database = tmp_path / "runs.db"
    with map_graph(lambda state: {"value": state["item"] + 1},
                   dask_address=cluster.scheduler_address,
                   checkpointer=SqliteCheckpointer(database, pickle=True)) as app:
        events = list(app.stream({"items": items}, config={"run_id": "r"}))
    branch_events = [e for e in events if e["type"] == "branch"]
    assert sorted(e["index"] for e in branch_events) == items
    assert [e["done"] for e in branch_events] == list(range(1, len(items) + 1))
    with sqlite3.connect(database) as connection:
        recorded = connection.execute("SELECT position FROM branches WHERE run_id = 'r' "
                                      "AND success = 1").fetchall()
    assert sorted(position for (position,) in recorded) == items


def test_batches_grow_while_branches_are_short_and_shrink_for_long_ones():
    from isobranch.isolation.dask_batches import MAX_BATCH, TARGET_TASK_SECONDS, BatchSizer

    sizer = BatchSizer(slots=2)
    assert sizer.next_size(1000) == 1, "the first tasks carry one branch"
    sizer.observe(1, 0.0001)
    assert sizer.next_size(1000) == 4, "at most four times what was measured"
    for branches in (4, 16, 64, 256):
        sizer.observe(branches, branches * 0.0001)
    # 0.1 ms each: about TARGET_TASK_SECONDS of work per task, and never over the cap.
    assert sizer.size == min(int(TARGET_TASK_SECONDS / 0.0001), MAX_BATCH)
    assert sizer.next_size(100_000) == sizer.size
    assert sizer.next_size(40) == 10, "a 1/(2 x slots) share of what is queued"
    sizer.observe(10, 10 * TARGET_TASK_SECONDS)
    assert sizer.next_size(1000) == 1, "branches as long as a task's target run alone"


def started_branch(*starts: tuple[float, str]):
    """A followed branch (no real task) whose current submission started at ``starts``."""
    from isobranch.isolation.dask_branches import FanOutWatch, FollowedBranch

    branch = FollowedBranch(run=None, fan_out=FanOutWatch())
    branch.starts.extend(starts)
    return branch


def test_on_a_one_thread_worker_only_the_last_branch_to_start_caused_its_death():
    # The earlier branch finished, but the scheduler had not heard so when the worker
    # died: it is killed too, and must run again without using a retry.
    import threading

    from isobranch.isolation.dask_branches import RunLedger

    ledger = RunLedger(retries=0, lock=threading.Lock())
    ledger.worker_started("w", 1)
    finished_unheard, crasher = started_branch((1.0, "w")), started_branch((2.0, "w"))
    ledger.worker_died("w", [finished_unheard, crasher])
    assert ledger.may_run_again(finished_unheard, "w")
    assert ledger.attempts(finished_unheard) == 0
    assert not ledger.may_run_again(crasher, "w")


def test_a_branch_sharing_deaths_with_others_on_many_threads_is_blamed_only_at_the_limit():
    import threading

    from isobranch.isolation.dask_branches import SHARED_DEATHS_LIMIT, RunLedger

    ledger = RunLedger(retries=0, lock=threading.Lock())
    crasher = started_branch()
    for death in range(SHARED_DEATHS_LIMIT):
        worker = f"w{death}"
        ledger.worker_started(worker, 2)
        crasher.current = len(crasher.starts)
        crasher.starts.append((float(death), worker))
        other = started_branch((death + 0.5, worker))
        ledger.worker_died(worker, [crasher, other])
        assert ledger.may_run_again(other, worker), "any of them may have killed it"
        blamed = not ledger.may_run_again(crasher, worker)
        assert blamed == (death == SHARED_DEATHS_LIMIT - 1)


def test_a_run_whose_result_died_with_its_worker_does_not_count():
    import threading

    from isobranch.isolation.dask_branches import RunLedger

    ledger = RunLedger(retries=0, lock=threading.Lock())
    branch = started_branch((1.0, "w"))
    ledger.result_lost(branch)
    branch.starts.append((2.0, "v"))  # the scheduler computes it again elsewhere
    assert ledger.attempts(branch) == 1
    assert ledger.rerun_failure(branch, "tls://scheduler") is None
