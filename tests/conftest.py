"""Shared fixtures: the backends every engine test is parametrized over."""

from __future__ import annotations

import importlib.util
import signal
import threading
from collections.abc import Iterator

import pytest

from isobranch import END, START, StateGraph, YAMLEngine

HAVE_DASK = importlib.util.find_spec("distributed") is not None


def pytest_configure(config: pytest.Config) -> None:
    # A session started with SIGINT ignored (a background job of a
    # non-interactive shell, some CI runners) passes that on to every process
    # it starts, and Python then installs no KeyboardInterrupt handler: the
    # tests that press Ctrl-C on a child need Python's normal disposition.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
# Every built-in backend; dask only runs where its extra is installed (CI installs it).
BACKENDS = ["inline", "thread", "process", pytest.param("dask", marks=pytest.mark.skipif(
    not HAVE_DASK, reason="the dask extra is not installed: pip install -e '.[test,dask]'"))]


@pytest.fixture(params=BACKENDS)
def isolation(request: pytest.FixtureRequest) -> str:
    """Name of the isolation backend under test."""
    return request.param


@pytest.fixture
def load(isolation: str):
    """Compile a YAML document (dict or text) on the backend under test; closed afterwards."""
    import yaml

    graphs = []

    def _load(document, **options):
        if isinstance(document, str):
            document = yaml.safe_load(document)
        graph = YAMLEngine(isolation=isolation, **options).load_from_dict(document)
        graphs.append(graph)
        return graph

    yield _load
    for graph in graphs:
        graph.close()
    assert not descendants(), "closing the graphs must end every worker process"


@pytest.fixture
def no_thread_leak():
    """Fail if the test leaves more threads running than it found."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"


def _resource_tracker(pid: int) -> bool:
    # multiprocessing's resource tracker (started by Dask's spawned workers) is
    # one per interpreter and lives until it exits: Python's, not a leak of ours.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing.resource_tracker" in cmdline.read()
    except OSError:
        return False


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields of /proc/PID/stat after the command name)`` of every process but zombies.

    ``fields[0]`` is the state, ``fields[1]`` the parent pid, ``fields[2]`` the
    process group.
    """
    import os

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie is dead; whether it is reaped is checked separately
            yield int(entry), fields


def descendants(pid: int | None = None) -> set[int]:
    """Pids of every live process below ``pid`` (default: this process), from ``/proc``.

    multiprocessing's per-interpreter resource tracker is left out.
    """
    import os

    root = os.getpid() if pid is None else pid
    parents: dict[int, list[int]] = {}
    for child, fields in live_processes():
        parents.setdefault(int(fields[1]), []).append(child)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid for pid in found if not _resource_tracker(pid)}


def children_including_zombies() -> set[int]:
    """Direct children of this process, reaped or not (a zombie is an unreaped child)."""
    import os

    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[1] == me:
                        found.add(int(entry))
            except OSError:
                continue
    return {pid for pid in found if not _resource_tracker(pid)}


@pytest.fixture
def no_process_leak():
    """Fail if the test leaves any process (or unreaped child) below this one."""
    before, before_children = descendants(), children_including_zombies()
    yield
    left = (descendants() - before) | (children_including_zombies() - before_children)
    assert not left, f"processes left behind: {sorted(left)}"


def fan_out(*branches, fan_in=None, start=None):
    """A graph start -> branches -> join, with branches given as (name, fn) pairs.

    The default fan-in keeps every ``ParallelFlowResult`` as ``results``.
    """
    graph = StateGraph()
    graph.add_node("start", start or (lambda state: None))
    graph.add_fan_in_node("join", fan_in or (lambda state, results: {"results": results}))
    for name, fn in branches:
        graph.add_node(name, fn)
        graph.add_parallel_edge("start", name, fan_in="join")
    graph.add_edge(START, "start")
    graph.add_edge("join", END)
    return graph


def invoke_concurrently(compiled, times: int = 4, state: dict | None = None) -> list[dict]:
    """Final states of ``times`` invocations of ``compiled`` started at once from threads."""
    outcomes: list[dict] = []
    threads = [threading.Thread(target=lambda: outcomes.append(compiled.invoke(dict(state or {}))))
               for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes
