"""Shared fixtures: the backends every engine test is parametrized over."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import threading
import time
import traceback

import pytest
from benchmarks.proc_scan import children, descendants, live_processes

from isobranch import END, START, StateGraph, YAMLEngine
from isobranch.isolation import register_backend, unregister_backend

HAVE_DASK = importlib.util.find_spec("distributed") is not None


def pytest_configure(config: pytest.Config) -> None:
    # A session started with SIGINT ignored (a background job of a
    # non-interactive shell, some CI runners) passes that on to every process
    # it starts, and Python then installs no KeyboardInterrupt handler: the
    # tests that press Ctrl-C on a child need Python's normal disposition.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


__all__ = ["BACKENDS", "HAVE_DASK", "blocked_in_threading", "children", "command_line",
           "descendants", "fan_out", "frames_of", "invoke_concurrently", "live_processes",
           "module_dask_cluster", "plain_environment", "processes_left_behind",
           "start_local_dask_cluster", "wait_until"]

# Every built-in backend; dask only runs where its extra is installed (CI installs it).
BACKENDS = ["inline", "thread", "process", pytest.param("dask", marks=pytest.mark.skipif(
    not HAVE_DASK, reason="the dask extra is not installed: pip install -e '.[test,dask]'"))]


# What a child process gets from this one by default: finding programs and
# code, a home, a temp directory, the locale. Nothing else, in particular no
# PYTHONUNBUFFERED (set on development machines and CI runners, not in a
# user's shell), so output a child would lose to buffering is lost in the
# tests as it is for users.
PLAIN_ENVIRONMENT_KEYS = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE", "PYTHONPATH")


def plain_environment(**extra: str) -> dict[str, str]:
    """The environment of a user's plain shell, for tests that start the CLI or pytest.

    Pass it as ``env=`` to ``subprocess``; ``extra`` adds variables a test needs.
    """
    env = {key: os.environ[key] for key in PLAIN_ENVIRONMENT_KEYS if key in os.environ}
    env.update(extra)
    return env


@pytest.fixture
def plain_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment is ``plain_environment()`` for the test, for children
    started by code that copies ``os.environ`` (pytester's ``runpytest_subprocess``)."""
    plain = plain_environment()
    for key in list(os.environ):
        if key not in plain:
            monkeypatch.delenv(key)


@pytest.fixture(params=BACKENDS)
def isolation(request: pytest.FixtureRequest) -> str:
    """Name of the isolation backend under test."""
    return request.param


@pytest.fixture
def load(isolation: str):
    """Compile a YAML document (dict or text) on the backend under test; closed afterwards."""
    import yaml

    before = descendants()
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
    assert not descendants() - before, "closing the graphs must end every worker process"


@pytest.fixture
def test_backend():
    """``test_backend(name, factory)`` registers a backend for this test only.

    Without ``replace``: a name some other test left registered fails here
    instead of silently standing in.
    """
    names: list[str] = []

    def register(name: str, factory) -> None:
        register_backend(name, factory)
        names.append(name)

    yield register
    for name in names:
        unregister_backend(name)


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


def processes_left_behind(before: set[int], grace: float = 0.0) -> dict[int, str]:
    """The processes below this one that were not in ``before``, each with its command line.

    ``grace``: seconds a process that is on its way out (a Dask worker whose
    nanny is still closing) may take to go first.
    """
    wait_until(lambda: not descendants() - before, grace)
    return {pid: command_line(pid) for pid in sorted(descendants() - before)}


def command_line(pid: int) -> str:
    """``pid``'s command line as one string ('' once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# How long a process a module's tests or fixtures closed may take to exit.
PROCESS_EXIT_GRACE_SECONDS = 5.0


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module(request: pytest.FixtureRequest):
    """Fail the module whose tests or fixtures leave a process running after it.

    Compared with the processes alive when the module started, so it blames
    the module that started one and never a later module (on an xdist
    worker, modules run one after another and a module may run again later:
    each run of it is checked). Autouse and module-scoped, it is set up
    before the module's own fixtures and torn down after them, so a
    cluster a module fixture closes is gone by then. A graph left unclosed
    is a leak here even though garbage collection would end its pool later:
    when is up to the collector, and it was another module's checks that
    failed then.
    """
    before = descendants()
    yield
    left = processes_left_behind(before, PROCESS_EXIT_GRACE_SECONDS)
    assert not left, (f"{request.node.nodeid} left processes running after its last test: "
                      + "; ".join(f"{pid}: {command[:200]}" for pid, command in left.items()))


@pytest.fixture
def no_process_leak():
    """Fail if the test leaves any process (or unreaped child) below this one."""
    before, before_children = descendants(), children()
    yield
    left = (descendants() - before) | (children() - before_children)
    assert not left, f"processes left behind: {sorted(left)}"


def start_local_dask_cluster(n_workers: int = 2, threads_per_worker: int = 1):
    """A cluster a user would have started: default scheduler settings, loopback, ports the
    OS picks (never a fixed one, so xdist workers never collide)."""
    import logging

    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                        processes=True, host="127.0.0.1", scheduler_port=0,
                        dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)


@contextlib.contextmanager
def module_dask_cluster(threads_per_worker: int = 1):
    """A module's shared cluster, whose worker processes are gone when it is left, also
    after a failed test: closing only tells them to stop, and one still ending would be
    taken for a leak by a later module's check."""
    before = descendants()
    with start_local_dask_cluster(threads_per_worker=threads_per_worker) as local:
        yield local
    assert wait_until(lambda: not descendants() - before), "the module's cluster left processes"


@pytest.fixture
def no_process_leak_beside_the_cluster(cluster):
    """``no_process_leak`` for a module whose own ``cluster`` fixture stays up across tests."""
    before = descendants()
    yield
    assert not descendants() - before, "the test left processes behind"


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
    """Final states of ``times`` invocations of ``compiled`` started at once from threads.

    An invocation that raises re-raises here (the first such exception, after
    every thread has ended); one still running after a minute is a failure.
    """
    outcomes: list[dict] = []
    errors: list[BaseException] = []
    start = threading.Barrier(times)

    def invoke() -> None:
        try:
            start.wait(30)
            outcomes.append(compiled.invoke(dict(state or {})))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=invoke) for _ in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    assert not stuck, f"invocations still running after 60 s: {stuck}"
    if errors:
        raise errors[0]
    return outcomes


def wait_until(condition, seconds: float = 60, interval: float = 0.02) -> bool:
    """Poll ``condition()`` every ``interval`` seconds until it holds; False once
    ``seconds`` pass first. For states another thread or process reaches with
    nothing to wait on (a file appearing, a process gone, lanes going idle)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.fixture
def callers_module(tmp_path, monkeypatch):
    """``callers_module(source)``: a module of the caller's own, written to a directory of
    its own under ``tmp_path`` and imported from there (a fresh name each time).

    As a script's ``myflow.py`` next to it: importable here, installed nowhere.
    ``on_sys_path=False`` loads it from its file instead, so it cannot be
    imported by name even here. Forgotten (``sys.modules``, ``sys.path``)
    when the test ends.
    """
    import importlib
    import sys
    import textwrap
    import uuid

    names: list[str] = []

    def make(source: str, *, name: str | None = None, on_sys_path: bool = True):
        name = name or f"callers_{uuid.uuid4().hex[:12]}"
        directory = tmp_path / name
        directory.mkdir()
        path = directory / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        names.append(name)
        if on_sys_path:
            monkeypatch.syspath_prepend(str(directory))
            return importlib.import_module(name)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    yield make
    for name in names:
        sys.modules.pop(name, None)


def frames_of(ident: int | None) -> list[str]:
    """Names of the functions on thread ``ident``'s stack, outermost first ([] if it ended)."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    return [entry.name for entry in traceback.extract_stack(frame)] if frame else []


# The functions of threading.py a blocked thread sits in: Event, Condition and
# Barrier waits, and Thread.join.
_THREADING_WAITS = frozenset({"wait", "join", "_wait_for_tstate_lock"})


def blocked_in_threading(ident: int | None) -> bool:
    """Whether thread ``ident`` is blocked in a ``threading`` wait or join right now.

    For ordering a test by where another thread *is* (waiting in a backoff,
    joining a pool) rather than by a sleep that usually lasts long enough.
    """
    frame = sys._current_frames().get(ident) if ident is not None else None
    return frame is not None and frame.f_code.co_filename == threading.__file__ \
        and frame.f_code.co_name in _THREADING_WAITS
