"""One root for every exception the library raises, and the branch traceback a
fail-fast error carries as its cause."""

from __future__ import annotations

import importlib
import inspect
import io
import pickle
import pkgutil
import subprocess
import sys
import traceback

import pytest

import isobranch
from conftest import BACKENDS, fan_out
from isobranch import END, START, GraphError, GraphExecutionError, IsobranchError, LuaRuntime
from isobranch.branch import BranchLimits, BranchTask
from isobranch.checkpoint.codec import decode_value, encode_value
from isobranch.errors import (
    BackendError,
    ConfigError,
    ConfigTypeError,
    LuaRuntimeError,
    NodePaused,
    RemoteTraceback,
    RunCancelled,
    StateDecodeError,
    StateEncodeError,
)
from isobranch.fanout_run import drive
from isobranch.isolation import create_backend
from isobranch.statecopy import StateSnapshot

# Exception classes of the package that are not IsobranchErrors, and why.
OUTSIDE_THE_ROOT = {
    # A BaseException like asyncio.CancelledError: no ``except Exception`` (nor
    # ``except IsobranchError``) may turn a cancellation into a failure. It never
    # reaches the caller, who gets asyncio.CancelledError.
    RunCancelled: "cancellation, not a failure",
    # The same for a pause: a node's ``except Exception`` must not turn it into
    # a failure; the run turns it into ``"__interrupt__"``.
    NodePaused: "a pause for answers, not a failure",
}


def _package_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined in isobranch, found after importing every module."""
    for module in pkgutil.walk_packages(isobranch.__path__, "isobranch."):
        if module.name != "isobranch.__main__":  # runs the command
            importlib.import_module(module.name)
    found, pending = [], [BaseException]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("isobranch.") and cls not in found:
            found.append(cls)
    return found


def test_every_exception_class_of_the_package_is_an_isobranch_error():
    classes = _package_exception_classes()
    assert len(classes) > 20, "the walk found the package's exceptions"
    outside = {cls for cls in classes if not issubclass(cls, IsobranchError)}
    assert outside == set(OUTSIDE_THE_ROOT)


def test_every_public_exception_class_lives_in_errors_py():
    # Private ones (a codec's internal unwinding) may stay next to their only user.
    misplaced = [f"{cls.__module__}.{cls.__qualname__}" for cls in _package_exception_classes()
                 if not cls.__name__.startswith("_") and cls.__module__ != "isobranch.errors"]
    assert misplaced == []


def test_isobranch_error_is_public():
    assert "IsobranchError" in isobranch.__all__
    assert isobranch.IsobranchError is IsobranchError


def _roundtrip(error: BaseException) -> BaseException:
    """``error`` pickled and unpickled by its own ``__reduce__``: without the reducers a
    library may register for every exception (distributed installs tblib's)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = {}
    pickler.dump(error)
    return pickle.loads(buffer.getvalue())


def _instance(cls: type[BaseException]) -> BaseException:
    """``cls`` built with a placeholder for each required argument of its constructor."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    required = [f"<{p.name}>" for p in list(parameters)[1:]
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(*required) if required else cls("message")


@pytest.mark.parametrize("cls", [cls for cls in _package_exception_classes()
                                 if issubclass(cls, IsobranchError)],
                         ids=lambda cls: cls.__name__)
def test_every_isobranch_error_pickles_with_its_attributes(cls):
    # Errors cross process boundaries; a constructor such as StateCopyError(path,
    # reason) must not break unpickling, and attributes must come along.
    error = _instance(cls)
    error.extra = {"marker": 7}
    copy = _roundtrip(error)
    assert type(copy) is cls
    assert (str(copy), copy.args) == (str(error), error.args)
    assert vars(copy) == vars(error)


def test_except_isobranch_error_catches_a_lua_error():
    with pytest.raises(IsobranchError) as caught:
        LuaRuntime().execute("error('boom')")
    assert isinstance(caught.value, LuaRuntimeError)


def test_except_isobranch_error_catches_a_graph_error():
    graph = isobranch.StateGraph()
    graph.add_node("a", lambda state: None)
    graph.add_edge("a", "nowhere")
    with pytest.raises(IsobranchError) as caught:
        graph.compile()
    assert isinstance(caught.value, GraphError)


def test_except_isobranch_error_catches_checkpoint_codec_errors():
    with pytest.raises(IsobranchError) as encoding:
        encode_value({"when": object()})
    with pytest.raises(IsobranchError) as decoding:
        decode_value("{not json")
    assert isinstance(encoding.value, StateEncodeError)
    assert isinstance(decoding.value, StateDecodeError)


def test_library_errors_keep_the_builtin_base_callers_catch():
    with pytest.raises(ConfigError) as bad_value:
        LuaRuntime(timeout=-1)
    with pytest.raises(ConfigTypeError) as bad_type:
        LuaRuntime().execute(b"return 1")
    backend = create_backend("thread", max_workers=1)
    backend.close()
    task = BranchTask(graph=None, name="b", start="b", fan_in="join", snapshot=StateSnapshot({}),
                      limits=BranchLimits(), isolation="thread")
    with pytest.raises(BackendError, match="thread backend is closed") as closed:
        list(drive(backend, [task]))  # the fan-out driver opens the closed backend
    assert isinstance(bad_value.value, ValueError)
    assert isinstance(bad_type.value, TypeError)
    assert isinstance(closed.value, RuntimeError)


# -- the branch's traceback as the cause of a fail-fast error -----------------


def explode(state):
    raise ValueError("kaboom in a branch")


def _formatted(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def _fail_fast_error(isolation: str) -> GraphExecutionError:
    graph = fan_out(("explode", explode))
    with graph.compile(isolation=isolation, max_workers=1, fail_fast=True) as app, \
            pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    return caught.value


def _shows_the_branch_frame(text: str) -> bool:
    return ("in explode" in text and 'raise ValueError("kaboom in a branch")' in text
            and "ValueError: kaboom in a branch" in text)


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_fail_fast_error_shows_the_failed_branchs_frames(isolation):
    error = _fail_fast_error(isolation)
    assert error.branch == "explode"
    assert isinstance(error.__cause__, RemoteTraceback)
    assert str(error.__cause__).strip() == error.traceback.strip()
    text = _formatted(error)
    assert _shows_the_branch_frame(text)
    assert text.index("in explode") < text.index("GraphExecutionError"), "cause first"


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_the_branch_traceback_survives_pickling(isolation):
    error = _fail_fast_error(isolation)
    for copy in (_roundtrip(error), pickle.loads(pickle.dumps(error))):
        assert isinstance(copy.__cause__, RemoteTraceback)
        assert _shows_the_branch_frame(_formatted(copy))


def test_a_main_path_failure_pickles_with_its_traceback_as_the_cause():
    graph = isobranch.StateGraph()
    graph.add_node("explode", explode)
    graph.add_edge(START, "explode")
    graph.add_edge("explode", END)
    with graph.compile(isolation="inline") as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert isinstance(caught.value.__cause__, ValueError), "the live exception, in this thread"
    copy = _roundtrip(caught.value)
    assert isinstance(copy.__cause__, RemoteTraceback)
    assert _shows_the_branch_frame(_formatted(copy))


def test_a_nested_branchs_failure_shows_through_the_outer_fail_fast_error():
    outer = isobranch.StateGraph()
    outer.add_node("start", lambda state: None)
    outer.add_node("inner_start", lambda state: None)
    outer.add_node("inner_explode", explode)
    outer.add_fan_in_node("inner_join", lambda state, results: None)
    outer.add_fan_in_node("join", lambda state, results: None)
    outer.add_parallel_edge("start", "inner_start", fan_in="join")
    outer.add_parallel_edge("inner_start", "inner_explode", fan_in="inner_join")
    outer.add_edge(START, "start")
    outer.add_edge("join", END)
    with outer.compile(isolation="thread", fail_fast=True) as app, \
            pytest.raises(GraphExecutionError) as caught:
        app.invoke({})
    assert caught.value.branch == "inner_start"
    assert _shows_the_branch_frame(_formatted(caught.value))


NODES = '''
def explode(state):
    raise ValueError("kaboom in a branch")
'''

UNCAUGHT = '''
from isobranch import END, START, StateGraph
from agent_nodes import explode

graph = StateGraph()
graph.add_node("start", lambda state: None)
graph.add_node("explode", explode)
graph.add_fan_in_node("join", lambda state, results: None)
graph.add_parallel_edge("start", "explode", fan_in="join")
graph.add_edge(START, "start")
graph.add_edge("join", END)
with graph.compile(isolation="process", max_workers=1, fail_fast=True) as app:
    app.invoke({})
'''


def test_an_uncaught_fail_fast_error_prints_the_worker_processs_frames(tmp_path):
    # The node comes from the user's module, which workers import (a function of
    # __main__ travels by value, and cloudpickle drops its file name).
    (tmp_path / "agent_nodes.py").write_text(NODES)
    script = tmp_path / "agent.py"
    script.write_text(UNCAUGHT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert f'File "{tmp_path / "agent_nodes.py"}"' in done.stderr
    assert _shows_the_branch_frame(done.stderr)
    assert "The above exception was the direct cause of the following exception" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("isobranch.errors.GraphExecutionError")
