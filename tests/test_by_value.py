"""The caller's own modules travel by value to workers that cannot import them.

``isolation/by_value.py`` decides which modules a pickled graph carries by
value (``Receiver``: Dask workers import only installed packages; worker
processes get the caller's ``sys.path``). A pickle is checked by loading it
in a new interpreter that runs elsewhere and cannot import the module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types
import uuid
from dataclasses import dataclass

import cloudpickle
import pytest

from conftest import wait_until
from isobranch import StateGraph
from isobranch.isolation import by_value
from isobranch.isolation.by_value import Receiver, pickle_by_value

FLOW = """
import {helper} as helpers
from {helper} import scale

OFFSET = 1


def work(x):
    return helpers.scale(x) + scale(OFFSET)
"""

HELPER = """
FACTOR = 3


def scale(x):
    return x * FACTOR
"""


def load_elsewhere(data: bytes, expression: str, cwd) -> subprocess.CompletedProcess:
    """Unpickle ``data`` as ``obj`` in a new interpreter in ``cwd`` (no PYTHONPATH); print
    ``expression``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = f"import pickle, sys; obj = pickle.loads(sys.stdin.buffer.read()); print({expression})"
    return subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                          cwd=cwd, env=env, timeout=60)


@pytest.fixture
def elsewhere(tmp_path):
    """A directory that holds none of the test's modules, to run a new interpreter in."""
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    return directory


def test_functions_of_modules_a_worker_cannot_import_travel_by_value(callers_module,
                                                                       elsewhere):
    helper = callers_module(HELPER)
    flow = callers_module(FLOW.format(helper=helper.__name__))
    by_reference = load_elsewhere(cloudpickle.dumps(flow.work), "obj(2)", elsewhere)
    assert f"No module named '{flow.__name__}'" in by_reference.stderr.decode()

    pickled = pickle_by_value({"work": flow.work}, Receiver.INSTALLED_PACKAGES)

    # The helper is met only once the flow travels by value (its functions' globals).
    assert pickled.by_value == (flow.__name__, helper.__name__)
    loaded = load_elsewhere(pickled.data, "obj['work'](2)", elsewhere)
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert loaded.stdout.decode().split() == ["9"]


def test_pickling_leaves_cloudpickles_registry_as_it_found_it(callers_module):
    ours = callers_module(HELPER)
    other = callers_module(HELPER)
    cloudpickle.register_pickle_by_value(ours)
    try:
        before = cloudpickle.list_registry_pickle_by_value()
        pickled = pickle_by_value([ours.scale, other.scale], Receiver.INSTALLED_PACKAGES)
        assert set(pickled.by_value) == {ours.__name__, other.__name__}
        assert cloudpickle.list_registry_pickle_by_value() == before
        with pytest.raises(TypeError, match="lock"):
            pickle_by_value([other.scale, threading.Lock()], Receiver.INSTALLED_PACKAGES)
        assert cloudpickle.list_registry_pickle_by_value() == before
    finally:
        cloudpickle.unregister_pickle_by_value(ours)


def test_a_module_that_cannot_travel_by_value_stays_by_reference_and_says_why(
        callers_module, elsewhere):
    locked = callers_module("""
        import threading

        LOCK = threading.Lock()


        def guarded(x):
            with LOCK:
                return x
    """)

    pickled = pickle_by_value([locked.guarded], Receiver.INSTALLED_PACKAGES)

    assert pickled.by_value == ()
    assert pickled.by_reference == {locked.__name__: "could not travel by value (TypeError: "
                                                     "cannot pickle '_thread.lock' object)"}
    loaded = load_elsewhere(pickled.data, "obj", elsewhere)
    assert f"No module named '{locked.__name__}'" in loaded.stderr.decode()


def test_installed_packages_and_the_engine_stay_by_reference():
    import json

    import _pytest.outcomes

    pickled = pickle_by_value([_pytest.outcomes.fail, StateGraph, json.dumps, os.getpid],
                              Receiver.INSTALLED_PACKAGES)

    assert pickled.by_value == ()
    # The standard library and isobranch go without saying; a package says how to get it.
    assert pickled.by_reference == {
        "_pytest": "is installed where the graph was built (pip install pytest)"}


def test_for_worker_processes_only_modules_off_the_callers_sys_path_travel_by_value(
        callers_module):
    on_path = callers_module(HELPER)
    off_path = callers_module(HELPER, on_sys_path=False)

    pickled = pickle_by_value([on_path.scale, off_path.scale], Receiver.CALLERS_SYS_PATH)

    assert pickled.by_value == (off_path.__name__,)


GRAPH_MODULE = """
from dataclasses import dataclass

from isobranch import StateGraph


@dataclass
class Report:
    value: int


def start(state):
    return None


def check(state):
    # The state's Report was made by the caller; the class here is the worker's.
    return {{"same_class": isinstance(state["report"], Report), "made": Report(2)}}


def join(state, results):
    (result,) = results
    return {{"same_class": result.state["same_class"], "made": result.state["made"]}}


def build():
    graph = StateGraph()
    graph.add_node("start", start)
    graph.add_node("check", check)
    graph.add_fan_in_node("join", join)
    graph.add_parallel_edge("start", "check", fan_in="join")
    graph.set_entry_point("start")
    return graph.compile(isolation="process", start_method={start_method!r})
"""


@pytest.mark.usefixtures("no_process_leak")
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_nodes_of_a_module_loaded_from_its_file_run_on_process_workers(callers_module,
                                                                        start_method):
    # Not importable by name anywhere: its functions must travel by value.
    helper = callers_module(HELPER, on_sys_path=False)
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("triple", lambda state: {"n": helper.scale(state["n"])})
    graph.add_fan_in_node("join", lambda state, results: {"n": results[0].state["n"]})
    graph.add_parallel_edge("start", "triple", fan_in="join")
    graph.set_entry_point("start")
    with graph.compile(isolation="process", start_method=start_method) as compiled:
        assert compiled.invoke({"n": 2})["n"] == 6


@pytest.mark.usefixtures("no_process_leak")
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_module_on_sys_path_is_imported_by_process_workers_so_its_classes_stay_one(
        callers_module, start_method):
    # Carried by value, the worker's Report would be a copy: the state's Report
    # (imported there) would not be an instance of it, and a Report made by the
    # node could not be sent back.
    flow = callers_module(GRAPH_MODULE.format(start_method=start_method))
    with flow.build() as compiled:
        final = compiled.invoke({"report": flow.Report(1)})
    assert final["same_class"] is True
    assert type(final["made"]) is flow.Report


@dataclass
class Gate:
    """Pickled, it calls ``on_pickle`` (then pickles as ``None``)."""

    on_pickle: object

    def __reduce__(self):
        self.on_pickle()
        return (type(None), ())


class WatchedLock:
    """A reentrant lock that tells when a given thread starts waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.watched: threading.Thread | None = None
        self.watched_waits = threading.Event()

    def __enter__(self):
        if threading.current_thread() is self.watched:
            self.watched_waits.set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()


def test_two_graphs_pickled_at_once_each_carry_their_module_by_value(callers_module, elsewhere,
                                                                     monkeypatch):
    # The first pickling has the module registered when the second one starts.
    # Unguarded, the second would find it registered, rely on that, and lose it
    # half-way through its own last pickling when the first one ends.
    flow = callers_module(HELPER)
    lock = WatchedLock()
    monkeypatch.setattr(by_value, "_REGISTRATION_LOCK", lock)
    first_done = threading.Event()
    second_waits_in_gate = threading.Event()
    second_gate_calls = []
    outcome: dict = {}

    def second_gate() -> None:
        second_gate_calls.append(1)
        if len(second_gate_calls) == 2:  # its pickling with the module registered
            second_waits_in_gate.set()
            first_done.wait(60)

    def run_second() -> None:
        outcome["second"] = pickle_by_value([Gate(second_gate), flow.scale],
                                            Receiver.INSTALLED_PACKAGES)

    second = threading.Thread(target=run_second)
    lock.watched = second

    def first_gate() -> None:
        if flow.__name__ in cloudpickle.list_registry_pickle_by_value() and not second.ident:
            second.start()
            # It either waits for the first to finish or gets as far as it can.
            assert wait_until(lambda: lock.watched_waits.is_set()
                              or second_waits_in_gate.is_set())

    first = pickle_by_value([Gate(first_gate), flow.scale], Receiver.INSTALLED_PACKAGES)
    first_done.set()
    second.join(60)

    assert second.ident and not second.is_alive()
    for pickled in (first, outcome["second"]):
        assert pickled.by_value == (flow.__name__,)
        loaded = load_elsewhere(pickled.data, "obj[1](2)", elsewhere)
        assert loaded.returncode == 0, loaded.stderr.decode()
        assert loaded.stdout.decode().split() == ["6"]


def module_in_memory(name: str, monkeypatch) -> object:
    """A module with no file, made here and put in ``sys.modules``, holding ``scale``."""
    module = types.ModuleType(name)
    exec("def scale(x):\n    return x * 3\n", module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.mark.parametrize("receiver", list(Receiver))
def test_a_module_made_in_memory_travels_by_value_and_one_an_installed_package_makes_does_not(
        receiver, monkeypatch):
    import pytest_timeout  # an installed module of one file

    made_here = module_in_memory(f"made_{uuid.uuid4().hex[:12]}", monkeypatch)
    # Like six.moves: a module without a file that an installed one-file module adds.
    in_package = module_in_memory(f"{pytest_timeout.__name__}.made_{uuid.uuid4().hex[:12]}",
                                  monkeypatch)

    pickled = pickle_by_value([made_here.scale, in_package.scale], receiver)

    assert pickled.by_value == (made_here.__name__,)
