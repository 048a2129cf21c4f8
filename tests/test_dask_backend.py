"""The Dask backend: branches as tasks on a ``distributed`` cluster.

The graph-level scenarios every backend shares (PY-002-*, fan-out semantics,
risk mitigations) run on ``dask`` through the ``isolation`` fixture; this
file covers where the cluster comes from and what only a cluster can break.
Every cluster here is a LocalCluster on 127.0.0.1 with ports the OS picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import yaml

from conftest import (
    HAVE_DASK,
    descendants,
    fan_out,
    invoke_concurrently,
    module_dask_cluster,
    plain_environment,
    start_local_dask_cluster,
    wait_until,
)
from isobranch import GraphError, GraphExecutionError, YAMLEngine

pytestmark = [
    pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed: "
                       "pip install -e '.[test,dask]'"),
    pytest.mark.usefixtures("no_process_leak_beside_the_cluster"),
]

ROOT = pathlib.Path(__file__).parent.parent
DEMO = ROOT / "examples" / "fan_out_demo.yaml"
DEMO_INPUT = {"items": [4, 8, 15]}


@pytest.fixture(scope="module")
def cluster():
    """One cluster for this module's tests that do not break workers."""
    with module_dask_cluster() as local:
        yield local


def worker_addresses(cluster) -> set[str]:
    return set(cluster.scheduler_info["workers"])


def demo(**engine_options):
    return YAMLEngine(**engine_options).load_from_file(DEMO)


def dies_once(marker: str):
    """A branch whose first run kills its worker process; a re-run finishes."""

    def node(state):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(7)
        return {"survived": True, "pid": os.getpid()}

    return node


def test_workflow_on_a_cluster_given_by_address_matches_the_other_backends(cluster):
    with demo(isolation="inline") as graph:
        expected = graph.invoke(DEMO_INPUT)
    with demo(isolation="dask", dask_address=cluster.scheduler_address) as graph:
        events = list(graph.stream(DEMO_INPUT))
    final = events[-1]["state"]
    (parallel,) = [e for e in events if e["type"] == "parallel"]
    assert final == expected
    assert {r.isolation for r in parallel["branches"]} == {"dask"}
    assert {r.worker for r in parallel["branches"]} <= worker_addresses(cluster)


def test_yaml_settings_parallel_dask_address_selects_the_cluster(cluster):
    document = yaml.safe_load(DEMO.read_text())
    document["settings"]["parallel"] = {"isolation": "dask",
                                        "dask": {"address": cluster.scheduler_address}}
    with YAMLEngine().load_from_dict(document) as graph:
        before = descendants()
        events = list(graph.stream(DEMO_INPUT))
        assert descendants() == before, "a cluster given by address must not start a local one"
    (parallel,) = [e for e in events if e["type"] == "parallel"]
    assert {r.worker for r in parallel["branches"]} <= worker_addresses(cluster)
    assert events[-1]["state"]["verdict"] == "big: total 27 >= 10"


def test_an_existing_client_is_used_and_left_open(cluster):
    from distributed import Client

    with Client(cluster, set_as_default=False) as client:
        graph = fan_out(("a", lambda s: {"n": 1}), ("b", lambda s: {"n": 2}))
        with graph.compile(isolation="dask", client=client) as compiled:
            results = compiled.invoke({})["results"]
        assert [r.state["n"] for r in results] == [1, 2]
        assert {r.worker for r in results} <= worker_addresses(cluster)
        assert client.status == "running", "closing the graph must not close the caller's client"
        assert client.submit(sum, [1, 2]).result() == 3


def test_local_cluster_starts_on_first_use_on_loopback_and_closes_with_the_graph():
    before = descendants()
    graph = demo(isolation="dask", max_workers=2)
    try:
        assert descendants() == before, "compiling must not start a cluster"
        events = list(graph.stream(DEMO_INPUT))
        assert len(descendants() - before) >= 2
        (parallel,) = [e for e in events if e["type"] == "parallel"]
        # The local cluster speaks TLS only (tests/test_dask_security.py).
        assert all(r.worker.startswith("tls://127.0.0.1:") for r in parallel["branches"])
    finally:
        graph.close()
    assert descendants() == before, "closing the graph must end the local cluster"


def worker_graph_plugins(dask_worker) -> list[str]:
    """Names of isobranch graph plugins on a worker (run there by ``client.run``)."""
    return sorted(name for name in dask_worker.plugins if name.startswith("isobranch-graph-"))


def scheduler_graph_plugins(dask_scheduler) -> list[str]:
    """Names of isobranch graph plugins the scheduler hands to workers."""
    return sorted(name for name in dask_scheduler.worker_plugins
                  if name.startswith("isobranch-graph-"))


def test_the_graph_travels_once_in_a_worker_plugin_not_per_task(cluster):
    from distributed import Client

    branches = [(f"b{i}", lambda s: {"ok": True}) for i in range(6)]
    with Client(cluster, set_as_default=False) as client:
        with fan_out(*branches).compile(isolation="dask", client=client) as compiled:
            for _ in range(3):
                assert all(r.success for r in compiled.invoke({})["results"])
            on_scheduler = client.run_on_scheduler(scheduler_graph_plugins)
            on_workers = client.run(worker_graph_plugins)
        assert len(on_scheduler) == 1, f"one graph for 18 branches, found {on_scheduler}"
        assert all(names == on_scheduler for names in on_workers.values())
        # Closing the graph takes it off the scheduler and every worker.
        assert client.run_on_scheduler(scheduler_graph_plugins) == []
        assert all(names == [] for names in client.run(worker_graph_plugins).values())


def test_the_graph_reaches_workers_that_restart_or_join_later():
    from distributed import Client

    graph = fan_out(*[(f"b{i}", lambda s: {"ok": True}) for i in range(4)])
    with start_local_dask_cluster() as own, Client(own, set_as_default=False) as client, \
            graph.compile(isolation="dask", client=client) as compiled:
        assert all(r.success for r in compiled.invoke({})["results"])
        client.restart_workers(list(worker_addresses(own)))  # every holder of the graph
        own.scale(3)
        client.wait_for_workers(3, timeout=60)
        results = compiled.invoke({})["results"]
        assert all(r.success for r in results), [r.error for r in results]
        assert all(names != [] for names in client.run(worker_graph_plugins).values())


def test_concurrent_first_fan_outs_send_the_graph_once(cluster):
    from distributed import Client

    graph = fan_out(("a", lambda s: {"ok": True}), ("b", lambda s: {"ok": True}))
    with Client(cluster, set_as_default=False) as client, \
            graph.compile(isolation="dask", client=client) as compiled:
        outcomes = invoke_concurrently(compiled)
        assert len(outcomes) == 4
        assert all(r.success for final in outcomes for r in final["results"])
        assert len(client.run_on_scheduler(scheduler_graph_plugins)) == 1


def test_a_worker_dying_mid_branch_fails_only_that_branch_and_names_the_worker(tmp_path):
    marker = str(tmp_path / "died")
    graph = fan_out(("dies", dies_once(marker)), ("lives", lambda s: {"fine": True}))
    with graph.compile(isolation="dask", max_workers=2) as compiled:
        dies, lives = compiled.invoke({})["results"]
        again = compiled.invoke({})["results"]  # the cluster recovered
    assert not dies.success and dies.error_type == "WorkerDied"
    assert "died while running it" in dies.error and "tls://127.0.0.1:" in dies.error
    # The start reached the scheduler before the branch ran, so the worker is known: the one named.
    assert dies.worker is not None and f"Dask worker {dies.worker} died" in dies.error
    assert lives.success and lives.state["fine"] is True
    assert [r.success for r in again] == [True, True]


def test_a_dead_workers_branch_is_retried_elsewhere_only_when_asked(tmp_path):
    marker = str(tmp_path / "died")
    graph = fan_out(("dies", dies_once(marker)))
    with graph.compile(isolation="dask", max_workers=2, retries=1) as compiled:
        (result,) = compiled.invoke({})["results"]
    assert os.path.exists(marker), "the first attempt ran and killed its worker"
    assert result.success and result.state["survived"] is True


def test_a_scheduler_that_reruns_tasks_itself_cannot_hide_a_worker_death(tmp_path):
    # A user's scheduler re-runs a task whose worker died (allowed-failures: 3); that run
    # finds the task claimed by the first and runs nothing, and without retries asked
    # the branch fails, naming the dead worker.
    marker = str(tmp_path / "died")
    graph = fan_out(("dies", dies_once(marker)), ("lives", lambda s: {"fine": True}))
    with start_local_dask_cluster() as user_cluster:
        before = worker_addresses(user_cluster)
        with graph.compile(isolation="dask", dask_address=user_cluster.scheduler_address
                           ) as compiled:
            dies, lives = compiled.invoke({})["results"]
    assert not dies.success and dies.error_type == "WorkerDied"
    dead = dies.error.split("Dask worker ")[1].split(" ")[0]
    assert dead in before and f"Dask worker {dead} died while running it" in dies.error
    assert "ran 2 times" not in dies.error
    assert lives.success


def test_an_unreachable_scheduler_is_a_clear_error_within_seconds():
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    graph = fan_out(("a", lambda s: None))
    with graph.compile(isolation="dask", dask_address=address, connect_timeout=2) as compiled:
        begin = time.monotonic()
        with pytest.raises(GraphExecutionError) as info:
            compiled.invoke({})
    assert time.monotonic() - begin < 10
    assert f"cannot reach the Dask scheduler at {address}" in str(info.value)
    assert info.value.node == "start"


def hang_in(how: str):
    """A node that never returns on its own when ``state["hang"]`` is set."""

    def node(state):
        if state.get("hang"):
            if how == "sleep":
                time.sleep(120)
            else:  # catastrophic backtracking: one C call that holds the GIL throughout
                import re

                re.match(r"(a+)+$", "a" * 64 + "b")
        return {"done": True}

    return node


@pytest.mark.parametrize("how", ["sleep", "gil"])
def test_a_branch_stuck_in_one_python_call_times_out_and_its_worker_is_restarted(how):
    graph = fan_out(("stuck", hang_in(how)), ("quick", lambda s: {"done": True}))
    # One single-threaded worker: whatever runs after the timeout needs it restarted.
    with graph.compile(isolation="dask", max_workers=1, branch_timeout=0.5) as compiled:
        begin = time.monotonic()
        stuck, quick = compiled.invoke({"hang": True})["results"]
        assert time.monotonic() - begin < 30
        again = compiled.invoke({})["results"]
    assert stuck.timed_out and stuck.error_type == "BranchTimeout"
    assert stuck.node == "stuck" and "in node 'stuck'" in stuck.error
    assert "is being restarted" in stuck.error and stuck.worker in stuck.error
    assert quick.success
    assert [r.success for r in again] == [True, True]


def test_a_branch_queued_behind_a_dying_one_on_the_same_worker_is_not_failed(tmp_path):
    marker = str(tmp_path / "died")
    graph = fan_out(("dies", dies_once(marker)), ("queued", lambda s: {"fine": True}))
    with graph.compile(isolation="dask", max_workers=1) as compiled:
        dies, queued = compiled.invoke({})["results"]
    assert dies.error_type == "WorkerDied"
    assert queued.success, queued.error


def pid_file_then(seconds: float, directory: str):
    """A node that writes its worker's pid to ``directory``/``<node>.pid`` and sleeps."""

    def node(state):
        with open(os.path.join(directory, "sleeper.pid"), "w") as out:
            out.write(str(os.getpid()))
        time.sleep(seconds)
        return {"slept": True}

    return node


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_fail_fast_on_the_local_cluster_stops_the_running_sibling(tmp_path):
    pid_file = tmp_path / "sleeper.pid"

    def boom(state):  # fails once the sibling is surely running
        assert wait_until(pid_file.exists)
        raise RuntimeError("boom")

    graph = fan_out(("boom", boom), ("sleeper", pid_file_then(120, str(tmp_path))))
    with graph.compile(isolation="dask", max_workers=2, fail_fast=True) as compiled:
        with pytest.raises(GraphExecutionError, match="boom"):
            compiled.invoke({})
        sleeper_pid = int(pid_file.read_text())
        assert wait_until(lambda: process_gone(sleeper_pid), 60), \
            "the worker running the cancelled sibling must be restarted"


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt (a BaseException too) without touching pytest's own."""


def test_an_interrupted_fan_out_stops_its_running_branch(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    graph = fan_out(("sleeper", pid_file_then(120, str(tmp_path))))

    def interrupt(signum, frame):
        raise Interrupted

    def signal_once_running():
        if wait_until(pid_file.exists):
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with graph.compile(isolation="dask", max_workers=1) as compiled:
            helper = threading.Thread(target=signal_once_running)
            helper.start()
            with pytest.raises(Interrupted):
                compiled.invoke({})
            helper.join(60)
            sleeper_pid = int(pid_file.read_text())
            assert wait_until(lambda: process_gone(sleeper_pid), 60)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_branch_whose_start_reaches_the_client_after_the_stop_still_has_its_worker_restarted(
        tmp_path):
    # The worker confirms a start with the scheduler before the branch runs, but the
    # scheduler passes it on to the client later: under load the branch can be seen
    # running (its pid file) and the run cancelled before the client heard where it runs.
    pid_file = tmp_path / "sleeper.pid"
    graph = fan_out(("sleeper", pid_file_then(120, str(tmp_path))))
    with graph.compile(isolation="dask", max_workers=1) as compiled:
        backend = next(iter(compiled._backends.values()))
        on_event, held = backend._on_event, []

        def starts_held_back(event):
            if event[1].get("kind") == "start" and held is not None:
                held.append(event)
            else:
                on_event(event)

        backend._on_event = starts_held_back  # subscribed on the first fan-out

        async def cancelled_once_running():
            run = asyncio.create_task(compiled.ainvoke({}))
            while not pid_file.exists():
                assert not run.done(), "the run ended before its branch started"
                await asyncio.sleep(0.01)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

        asyncio.run(cancelled_once_running())
        late, held = held, None
        assert late, "the start was held back until after the stop"
        client = backend._connection.client
        for event in late:  # delivered as the client's event loop would, late
            client.loop.add_callback(on_event, event)
        sleeper_pid = int(pid_file.read_text())
        assert wait_until(lambda: process_gone(sleeper_pid), 60), \
            "the worker running the cancelled branch must be restarted"
        assert wait_until(lambda: client.run_on_scheduler(claims_held) == []), \
            "the late start's claim is let go too"


def claims_held(dask_scheduler) -> list[str]:
    """The task claims (multi-lock names) the scheduler holds for isobranch."""
    return [name for name, users in dask_scheduler.extensions["multi_locks"].locks.items()
            if users and name.startswith("isobranch-")]


def test_closing_the_graph_during_a_fan_out_fails_it_as_closed(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    graph = fan_out(("sleeper", pid_file_then(120, str(tmp_path))))
    compiled = graph.compile(isolation="dask", max_workers=1)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["final"] = compiled.invoke({})
        except Exception as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    assert wait_until(pid_file.exists)
    compiled.close()
    runner.join(60)
    assert not runner.is_alive()
    assert isinstance(outcome.get("error"), GraphExecutionError), outcome
    assert "the dask backend was closed while running" in str(outcome["error"])


def test_a_closed_client_is_a_clear_error(cluster):
    from distributed import Client

    client = Client(cluster, set_as_default=False)
    client.close()
    graph = fan_out(("a", lambda s: None))
    compiled = graph.compile(isolation="dask", client=client)
    with compiled, pytest.raises(GraphExecutionError,
                                 match=r"the distributed\.Client passed in is closed"):
        compiled.invoke({})


def test_a_scheduler_that_accepts_but_never_answers_is_unreachable_within_seconds():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        graph = fan_out(("a", lambda s: None))
        compiled = graph.compile(isolation="dask", dask_address=address, connect_timeout=1)
        begin = time.monotonic()
        with compiled, pytest.raises(GraphExecutionError,
                                     match="accepted the connection but did not answer"):
            compiled.invoke({})
        assert time.monotonic() - begin < 10


def test_options_are_checked_when_the_graph_compiles():
    graph = fan_out(("a", lambda s: None))
    with pytest.raises(GraphError, match="not both"):
        graph.compile(isolation="dask", dask_address="tcp://127.0.0.1:1", client=object())
    with pytest.raises(GraphError, match="retries"):
        graph.compile(isolation="dask", retries=-1)
    with pytest.raises(GraphError, match="disagree"):
        graph.compile(isolation="dask", dask_address="tcp://a:1", address="tcp://b:1")


def test_without_the_extra_compiling_for_dask_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "distributed" else real(name, *a))
    with pytest.raises(GraphError, match=r"pip install '\.\[dask\]' in the isobranch checkout"):
        fan_out(("a", lambda s: None)).compile(isolation="dask")


def test_a_node_that_cannot_travel_is_named(cluster):
    lock = threading.Lock()
    graph = fan_out(("holds_lock", lambda s: {"locked": lock.locked()}))
    compiled = graph.compile(isolation="dask", dask_address=cluster.scheduler_address)
    with compiled, pytest.raises(GraphExecutionError,
                                 match="node 'holds_lock' cannot be sent to Dask workers"):
        compiled.invoke({})


def test_documented_dask_settings_block_runs(cluster):
    page = (ROOT / "docs" / "backends.md").read_text()
    section = page.split("## The Dask backend", 1)[1]
    settings = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    parallel = settings["settings"]["parallel"]
    assert parallel["isolation"] == "dask" and parallel["dask"]["address"].startswith("tcp://")
    parallel["dask"]["address"] = cluster.scheduler_address  # the documented host is an example
    document = {**settings, "nodes": [
        {"name": "start", "run": "return {}"},
        {"name": "a", "language": "lua", "run": "return {lua = true}"},
        {"name": "join", "fan_in": True,
         "run": "return {'ok': parallel_results[0].success, 'worker': parallel_results[0].worker}"}],
        "edges": [{"from": "start", "to": "a", "type": "parallel", "fan_in": "join"}]}
    with YAMLEngine().load_from_dict(document) as graph:
        final = graph.invoke({})
    assert final["ok"] is True and final["worker"] in worker_addresses(cluster)


class CommandLineCluster:
    """``dask scheduler`` and ``dask worker`` as a user starts them, on loopback, any port."""

    def __init__(self, directory: pathlib.Path, workers: int = 1) -> None:
        self.scheduler_file = directory / "scheduler.json"
        dask = [sys.executable, "-m", "dask"]
        # Each command in a process group of its own: ``dask worker`` runs its worker in a
        # child of its nanny, which ends with the group rather than whenever it notices.
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                 "start_new_session": True}
        self.scheduler = subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(self.scheduler_file)], **quiet)
        self.workers = [subprocess.Popen(
            [*dask, "worker", "--scheduler-file", str(self.scheduler_file), "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard"], **quiet) for _ in range(workers)]
        try:
            self.address = self._wait_for_workers(workers)
        except BaseException:
            self.close()  # a fixture that fails to start never reaches its teardown
            raise

    def _wait_for_workers(self, count: int) -> str:
        from distributed import Client

        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists():
            assert time.monotonic() < deadline and self.scheduler.poll() is None, \
                "dask scheduler did not start"
            time.sleep(0.05)  # polling for a file another process writes
        with Client(scheduler_file=str(self.scheduler_file), set_as_default=False) as client:
            if count:
                client.wait_for_workers(count, timeout=60)
            return client.scheduler.address

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture
def command_line_cluster(tmp_path):
    started = CommandLineCluster(tmp_path)
    yield started
    started.close()


@pytest.fixture(scope="module")
def shared_command_line_cluster(tmp_path_factory):
    """One ``dask scheduler`` and ``dask worker`` for this module's tests that leave them as
    they found them."""
    started = CommandLineCluster(tmp_path_factory.mktemp("shared-cluster"))
    yield started
    started.close()


def test_a_cluster_started_with_the_dask_commands_runs_the_workflow(command_line_cluster):
    with demo(isolation="inline") as graph:
        expected = graph.invoke(DEMO_INPUT)
    with demo(isolation="dask", dask_address=command_line_cluster.address) as graph:
        final = graph.invoke(DEMO_INPUT)
        (parallel,) = [e for e in graph.stream(DEMO_INPUT) if e["type"] == "parallel"]
    assert final == expected
    assert all(r.worker.startswith("tcp://127.0.0.1:") for r in parallel["branches"])


def test_a_scheduler_lost_mid_run_fails_the_pending_branches_within_seconds(
        command_line_cluster, tmp_path):
    started = tmp_path / "started"

    def long_branch(state):
        open(started, "w").close()
        time.sleep(60)

    graph = fan_out(("long", long_branch))
    with graph.compile(isolation="dask", dask_address=command_line_cluster.address,
                       connect_timeout=2) as compiled:
        outcome: dict = {}

        def run() -> None:
            begin = time.monotonic()
            outcome["results"] = compiled.invoke({})["results"]
            outcome["seconds"] = time.monotonic() - begin

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for a file the branch writes
        assert started.exists(), "the branch never started"
        killed_at = time.monotonic()
        command_line_cluster.scheduler.kill()
        runner.join(timeout=60)
        assert not runner.is_alive(), "a lost scheduler must not hang the fan-out"
        assert time.monotonic() - killed_at < 20
    (result,) = outcome["results"]
    assert not result.success
    assert "lost the connection to the Dask scheduler" in result.error


def test_a_cluster_with_no_worker_fails_the_branches_after_worker_wait(tmp_path):
    scheduler_only = CommandLineCluster(tmp_path, workers=0)
    try:
        graph = fan_out(("a", lambda s: {"ran": True}), ("b", lambda s: {"ran": True}))
        with graph.compile(isolation="dask", dask_address=scheduler_only.address,
                           worker_wait=2) as compiled:
            begin = time.monotonic()
            results = compiled.invoke({})["results"]
            waited = time.monotonic() - begin
    finally:
        scheduler_only.close()
    assert [r.success for r in results] == [False, False]
    assert all(f"the Dask cluster at {scheduler_only.address} had no worker for 2s" in r.error
               for r in results), [r.error for r in results]
    assert waited >= 2, "a cluster is given worker_wait seconds to get a worker"
    assert not any("ran" in r.state for r in results)


def hangs_when_asked(seconds: float, directory: str):
    """Like ``pid_file_then``, but returns at once unless ``state["hang"]`` is set."""
    sleeper = pid_file_then(seconds, directory)
    return lambda state: sleeper(state) if state.get("hang") else {"quick": True}


def cuts_the_connection_when_asked_whether_it_is_there():
    """A function for ``run_on_scheduler``: the scheduler drops the connection of every ``identity`` request.

    Made here, not at module level, so it travels by value (the scheduler
    cannot import this test module).
    """

    def install(dask_scheduler) -> None:
        def cut(comm, **kwargs):
            comm.abort()

        dask_scheduler.handlers["identity"] = cut

    return install


def test_a_connection_lost_while_a_fan_out_asks_after_the_scheduler_is_a_lost_connection(
        command_line_cluster, tmp_path):
    # The client's own connection stays up: only the question's breaks, so
    # the answer (a broken connection, not silence) decides the message.
    from distributed import Client

    address = command_line_cluster.address
    graph = fan_out(("long", hangs_when_asked(120, str(tmp_path))))
    with graph.compile(isolation="dask", dask_address=address, connect_timeout=2) as compiled:
        assert compiled.invoke({})["results"][0].success  # connected, the graph shipped
        with Client(address, set_as_default=False) as other:
            other.run_on_scheduler(cuts_the_connection_when_asked_whether_it_is_there())
        # Quiet for five seconds, the fan-out asks the scheduler whether it is still there.
        (result,) = compiled.invoke({"hang": True})["results"]
    assert not result.success
    assert f"lost the connection to the Dask scheduler at {address}" in result.error, result.error
    assert "stopped answering" not in result.error


SCRIPT = """
from isobranch import StateGraph

def build():
    graph = StateGraph()
    graph.add_node("start", lambda s: None)
    graph.add_node("a", lambda s: {"a": 1})
    graph.add_fan_in_node("join", lambda s, results: {"worker": results[0].worker})
    graph.add_parallel_edge("start", "a", fan_in="join")
    graph.set_entry_point("start")
    with graph.compile(isolation="dask", max_workers=1) as app:
        print("worker", app.invoke({})["worker"])
"""


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_a_script_on_the_local_cluster_needs_a_main_guard_and_is_told_so(tmp_path, guarded):
    entry = 'if __name__ == "__main__":\n    build()\n' if guarded else "build()\n"
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT + entry)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=plain_environment())
    if guarded:
        assert done.returncode == 0, done.stderr
        assert "worker tls://127.0.0.1:" in done.stdout
    else:
        assert done.returncode != 0
        assert "could not start a local Dask cluster" in done.stderr
        assert f'{script}: guard its entry point with `if __name__ == "__main__":`' in done.stderr


def test_the_command_line_runs_a_workflow_on_a_local_dask_cluster():
    command = [sys.executable, "-m", "isobranch", "run", str(DEMO), "--input",
               '{"items": [4, 8, 15]}']
    on_dask = subprocess.run([*command, "--isolation", "dask"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT, env=plain_environment())
    inline = subprocess.run([*command, "--isolation", "inline"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=plain_environment())
    assert on_dask.returncode == 0, on_dask.stderr
    assert on_dask.stdout == inline.stdout


def test_a_scheduler_that_stops_answering_mid_run_fails_the_fan_out_within_seconds(
        command_line_cluster, tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    graph = fan_out(("sleeper", pid_file_then(120, str(tmp_path))))
    compiled = graph.compile(isolation="dask", dask_address=command_line_cluster.address,
                             connect_timeout=2)
    outcome: dict = {}

    def run() -> None:
        outcome["final"] = compiled.invoke({})

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert wait_until(pid_file.exists)
        stopped_at = time.monotonic()
        command_line_cluster.scheduler.send_signal(signal.SIGSTOP)
        runner.join(60)
        assert not runner.is_alive(), "a frozen scheduler must not hang the fan-out"
        assert time.monotonic() - stopped_at < 30
        begin = time.monotonic()
        compiled.close()
        assert time.monotonic() - begin < 10, "nor close()"
    finally:
        command_line_cluster.scheduler.send_signal(signal.SIGCONT)
    (result,) = outcome["final"]["results"]
    assert not result.success and "stopped answering" in result.error


CALLERS_FLOW = """
from dataclasses import dataclass
from typing import Annotated, TypedDict

import {helper} as helpers
from {helper} import scale

from isobranch import StateGraph


@dataclass
class Report:
    value: int


def add(total, more):
    return (total or 0) + more


class State(TypedDict, total=False):
    items: list
    item: int
    index: int
    total: Annotated[int, add]
    report: Report
    reports: list


def start(state):
    return {{"items": [1, 2, 3]}}


def work(state):
    return {{"total": helpers.scale(state["item"]), "report": Report(scale(state["item"]))}}


def join(state, results):
    return {{"reports": [r.state["report"] for r in results]}}


def build(**options):
    graph = StateGraph(State)
    graph.add_node("start", start)
    graph.add_node("work", work)
    graph.add_fan_in_node("join", join)
    graph.add_map_edge("start", "work", over="items", fan_in="join")
    graph.set_entry_point("start")
    return graph.compile(**options)
"""

CALLERS_HELPER = """
FACTOR = 3


def scale(x):
    return x * FACTOR
"""


def importable_on_workers(address: str, modules: list[str]) -> set[bool]:
    from distributed import Client

    def find(names):
        import importlib.util

        return any(importlib.util.find_spec(name) is not None for name in names)

    with Client(address, set_as_default=False) as client:
        return set(client.run(find, modules).values())


def graph_plugins_on_the_scheduler(address: str) -> list[str]:
    from distributed import Client

    def names(dask_scheduler):  # made here: travels by value to the scheduler's process
        return sorted(name for name in dask_scheduler.worker_plugins
                      if name.startswith("isobranch-graph-"))

    with Client(address, set_as_default=False) as client:
        return client.run_on_scheduler(names)


def test_nodes_of_the_callers_own_modules_run_on_a_cluster_that_cannot_import_them(
        shared_command_line_cluster, callers_module):
    # A script's myflow.py and the helper module it imports: importable here only.
    helper = callers_module(CALLERS_HELPER)
    flow = callers_module(CALLERS_FLOW.format(helper=helper.__name__))
    address = shared_command_line_cluster.address
    assert importable_on_workers(address, [flow.__name__, helper.__name__]) == {False}
    with flow.build(isolation="inline") as compiled:
        expected = compiled.invoke({})
    with flow.build(isolation="dask", dask_address=address) as compiled:
        final = compiled.invoke({})
    assert final == expected and final["total"] == 18
    # Instances of the module's class come back as the caller's class.
    assert all(type(report) is flow.Report for report in final["reports"])


def test_a_module_that_cannot_reach_the_workers_fails_at_once_naming_it(
        shared_command_line_cluster, callers_module):
    locked = callers_module("""
        import threading

        LOCK = threading.Lock()


        def guarded(state):
            with LOCK:
                return {"ran": True}
    """)
    graph = fan_out(("guarded", locked.guarded))
    address = shared_command_line_cluster.address
    with graph.compile(isolation="dask", dask_address=address, worker_wait=120) as compiled:
        begin = time.monotonic()
        with pytest.raises(GraphExecutionError) as failure:
            compiled.invoke({})
        assert time.monotonic() - begin < 60, "a worker that cannot load the graph says so at once"
    message = str(failure.value)
    assert f"could not send the graph to the Dask cluster at {address}: Dask worker " \
           f"tcp://127.0.0.1:" in message
    assert f"cannot load the graph: ModuleNotFoundError: No module named '{locked.__name__}' " \
           f"(module '{locked.__name__}' could not travel by value (TypeError: cannot pickle " \
           f"'_thread.lock' object): install it on every worker, or put its directory on " \
           f"their PYTHONPATH)" in message
    assert "within" not in message
    # Nor is the graph left on the cluster for workers that join later.
    assert graph_plugins_on_the_scheduler(address) == []


def test_a_worker_that_cannot_load_the_graph_keeps_saying_why_for_its_tasks(callers_module,
                                                                          monkeypatch):
    from isobranch.errors import BackendError
    from isobranch.isolation import dask_worker
    from isobranch.isolation.dask_worker import GraphPlugin, run_on_worker

    helper = callers_module(CALLERS_HELPER)
    graph_bytes = pickle.dumps(helper.scale)
    del sys.modules[helper.__name__]  # as on a worker that joins later, without the module
    sys.path.remove(str(pathlib.Path(helper.__file__).parent))
    plugin = pickle.loads(pickle.dumps(GraphPlugin(
        graph_bytes, by_reference={helper.__name__: "is installed where the graph was built"})))

    worker = types.SimpleNamespace(address="tcp://10.0.0.7:4000", plugins={"graph": plugin})
    with pytest.raises(BackendError) as failure:
        plugin.setup(worker=worker)

    assert str(failure.value) == (
        f"Dask worker tcp://10.0.0.7:4000 cannot load the graph: ModuleNotFoundError: No "
        f"module named '{helper.__name__}' (module '{helper.__name__}' is installed where the "
        f"graph was built: install it on every worker, or put its directory on their "
        f"PYTHONPATH)")
    assert plugin.graph is None
    # Its failed setup is only logged when it joins later: its tasks say it.
    monkeypatch.setattr(dask_worker, "get_worker", lambda: worker)
    with pytest.raises(BackendError) as task_failure:
        run_on_worker("graph", {}, "topic", "key")
    assert str(task_failure.value) == str(failure.value)


@pytest.mark.parametrize(("missing", "hint"), [
    ("myflow", "install module 'myflow' on every worker, or put its directory on their "
               "PYTHONPATH"),
    ("isobranch.isolation", "install isobranch with its dask extra on every worker, at the "
                            "caller's version")])
def test_a_task_failing_for_a_missing_module_names_it_and_what_to_install(missing, hint):
    # A map item of a class from the caller's module, say: the task's arguments
    # do not load on the worker.
    from isobranch.branch import BranchRun
    from isobranch.isolation.dask_branches import FanOutWatch, FollowedBranch, describe_failure

    error = ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    branch = FollowedBranch(BranchRun(task=None, position=0), fan_out=FanOutWatch())
    assert describe_failure(branch, "error", error, None, connection=None) == (
        f"the Dask task failed on the worker: ModuleNotFoundError: No module named "
        f"{missing!r} ({hint})")


def kills_the_scheduler_when_asked_for_a_result():
    """A function for ``run_on_scheduler``: the scheduler process dies on the first ``gather``.

    Made here, not at module level, so it travels by value (the scheduler
    cannot import this test module).
    """

    def install(dask_scheduler) -> None:
        def die(comm, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        dask_scheduler.handlers["gather"] = die

    return install


def test_a_scheduler_lost_while_a_result_is_fetched_fails_every_pending_branch_alike(
        command_line_cluster, tmp_path):
    # The first branch finishes, and the scheduler dies as the client asks it
    # for that result: the branch being fetched and those still running are
    # all pending on the same lost scheduler, and say so the same way.
    from distributed import Client

    address = command_line_cluster.address
    graph = fan_out(("quick", lambda state: {"quick": True}),
                    ("slow_a", pid_file_then(120, str(tmp_path))),
                    ("slow_b", pid_file_then(120, str(tmp_path))))
    with Client(address, set_as_default=False) as other:
        other.run_on_scheduler(kills_the_scheduler_when_asked_for_a_result())
    with graph.compile(isolation="dask", dask_address=address, connect_timeout=2) as compiled:
        begin = time.monotonic()
        results = compiled.invoke({})["results"]
        assert time.monotonic() - begin < 30, "a lost scheduler must not hang the fan-out"
    assert command_line_cluster.scheduler.wait(timeout=10) == -signal.SIGKILL
    assert [r.success for r in results] == [False, False, False]
    assert {r.error_type for r in results} == {"DaskError"}, [r.error for r in results]
    reasons = {r.error.removeprefix(f"branch {r.branch!r}: ") for r in results}
    assert len(reasons) == 1, [r.error for r in results]
    assert reasons == {f"lost the connection to the Dask scheduler at {address} "
                       f"(not back within 2s)"}
