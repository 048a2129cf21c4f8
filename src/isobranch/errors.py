"""Every exception isobranch raises, rooted at ``IsobranchError``.

``except IsobranchError`` catches whatever the library raises: an invalid
graph, a failed run, a Lua error, a backend that cannot run, a checkpoint
that cannot be encoded. Classes that callers (and older code) catch by a
builtin base keep that base too (``ConfigError`` is a ``ValueError``,
``BackendError`` a ``RuntimeError``); each docstring says why.

The one exception outside the root is ``RunCancelled``: a ``BaseException``
on purpose, like ``asyncio.CancelledError``, so that no ``except
Exception`` in a node turns a cancellation into a failure.

This module is a leaf: it imports nothing of the package but
``error_kinds``, so every module (the Lua package too) imports its
exceptions from here without an import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .error_kinds import plain


def _new_error(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """An instance of ``cls`` with ``args``, made without its ``__init__`` (unpickling)."""
    return cls.__new__(cls, *args)


class IsobranchError(Exception):
    """The root of every exception isobranch raises: ``except IsobranchError`` catches them all.

    Every subclass pickles with its attributes whatever its constructor
    takes, since errors cross process boundaries (a branch in a worker, a
    run under pytest-xdist, a result sent back by Dask).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException would call cls(*args), which fails for a constructor that
        # takes other arguments than its message (StateCopyError(path, reason)).
        return _new_error, (type(self), self.args), self.__dict__ or None


# -- the graph and its settings ------------------------------------------------


class GraphError(IsobranchError):
    """A graph or YAML document is invalid.

    ``problems`` lists every problem found, each already naming its location
    (file, node or edge); the message joins them.
    """

    def __init__(self, message: str | None = None, *, problems: list[str] | None = None,
                 source: str | None = None) -> None:
        self.problems = list(problems) if problems else ([message] if message else [])
        self.source = source
        text = message if message is not None else "; ".join(self.problems)
        if source and not text.startswith(source):
            text = f"{source}: {text}"
        super().__init__(text)


class RunExistsError(GraphError):
    """A new run was given the id of a run the database already holds.

    ``run_id`` and ``path`` (the database) let a caller say what to do in
    its own words; the message says it in the library's.
    """

    def __init__(self, run_id: str, path: Path) -> None:
        super().__init__(f"run {run_id!r} already exists in {str(path)!r}: resume it with "
                         f"resume({run_id!r}), delete it with delete_run({run_id!r}), or "
                         f"choose another run_id")
        self.run_id = run_id
        self.path = path


class GraphChangedError(GraphError):
    """A run cannot be resumed as it is: its graph changed since the run started.

    ``run_id``, ``path`` (the database) and ``changes`` (one phrase per
    change, such as ``node 'score' changed``) let a caller say what to do
    in its own words; the message says it in the library's (``force=True``).
    """

    def __init__(self, run_id: str, path: Path, changes: list[str]) -> None:
        super().__init__(f"run {run_id!r} in {str(path)!r}: the graph changed since the run "
                         f"started ({'; '.join(changes)}); resume with force=True to run the "
                         f"changed graph anyway")
        self.run_id = run_id
        self.path = path
        self.changes = list(changes)


class MissingRecording(IsobranchError):
    """A recorded node (``replay: true``) was called with no recording of that call on the
    run's tape; the message says where the recordings come from and how to record it."""


class ConfigError(IsobranchError, ValueError):
    """An argument, option or setting has an unusable value (``max_workers=0``, a size
    such as ``"12 parsecs"``, a retry policy with no attempts, an unknown backend name to
    unregister).

    Also a ``ValueError``: that is what Python code raises for a bad argument
    value and what callers catch.
    """


class ConfigTypeError(IsobranchError, TypeError):
    """An argument has the wrong type (a node that is not callable, Lua code that is not a
    ``str``).

    Also a ``TypeError``: that is what Python code raises for an argument of
    the wrong type and what callers catch.
    """


class InputError(IsobranchError):
    """The command line or its ``--input`` is unusable."""


class GraphvizError(IsobranchError):
    """A graph cannot be drawn as SVG or PNG: Graphviz's ``dot`` program is missing
    (the message says what to install), failed (with what it said) or timed out."""


# -- a run that failed ---------------------------------------------------------


class RemoteTraceback(IsobranchError):
    """The traceback of code that failed where its frames cannot follow, as text.

    A branch may run in another thread, process or machine; only its
    traceback's text comes back (in ``ParallelFlowResult.traceback``). A
    ``GraphExecutionError`` that reports such a failure has one of these as
    its ``__cause__``, whose ``str()`` is that text, so an uncaught error
    prints the failing branch's frames above its own.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        # On the line after the class name, as Python prints a traceback.
        return "\n" + self.text.rstrip("\n")


class GraphExecutionError(IsobranchError):
    """A node failed while the graph ran.

    Attributes name where it happened: ``node``, ``branch`` (None on the main
    path), ``error_type`` (the class name of the original exception),
    ``state`` (the state as of the failure), ``traceback`` (the failing
    code's traceback as text, also when it ran in another process),
    ``error_bases`` (the base class names of that exception, nearest first),
    ``attempts`` (how often the failing node ran), for a failed fan-out,
    ``results`` (every branch's ``ParallelFlowResult``), and for a
    checkpointed run its ``run_id`` (to resume it).

    Given a ``traceback``, the error's ``__cause__`` is a ``RemoteTraceback``
    of it, unless it is raised ``from`` the live exception (a node that failed
    in this very thread); after pickling, it is always the text's.
    """

    # Defaults for an error unpickled from a sender that did not set them all.
    run_id: str | None = None
    node: str | None = None
    branch: str | None = None
    error_type: str | None = None
    state: dict | None = None
    results: list[Any] | None = None
    timed_out: bool = False
    traceback: str | None = None
    error_bases: tuple[str, ...] = ()
    attempts: int = 1

    def __init__(self, message: str, *, node: str | None = None, branch: str | None = None,
                 error_type: str | None = None, state: dict | None = None,
                 results: list[Any] | None = None, timed_out: bool = False,
                 traceback: str | None = None, error_bases: tuple[str, ...] = (),
                 attempts: int = 1, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.node = node
        self.branch = branch
        self.error_type = plain(error_type)
        self.state = state
        self.results = results
        self.timed_out = timed_out
        self.traceback = traceback
        self.error_bases = error_bases
        self.attempts = attempts
        self._chain_traceback()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._chain_traceback()  # the cause does not survive pickling; its text does

    def _chain_traceback(self) -> None:
        if self.traceback and self.__cause__ is None:
            self.__cause__ = RemoteTraceback(self.traceback)


class NodeFailure(GraphExecutionError):
    """A node raised or returned something unusable; names the node and branch."""


class StateSchemaError(GraphExecutionError):
    """An update broke the schema: a declared type, or a reducer that could not combine it."""


class ReducerError(IsobranchError, ValueError):
    """An update cannot be combined with the key's value (the message says why).

    Also a ``ValueError``: a callable reducer's own ``ValueError`` and this one
    are reported alike.
    """


class UncheckableType(IsobranchError, ValueError):
    """An annotation that isinstance cannot check (a TypeVar, a forward reference, ...).

    Also a ``ValueError``: the annotation is a value the checker refuses.
    """


class MapOverError(IsobranchError, ValueError):
    """A map's ``over`` did not give a list; the message names the key or expression.

    Also a ``ValueError``: ``over`` gave a value a map cannot use.
    """


class FanOutPlanError(IsobranchError):
    """A fan-out could not be planned: its items, or its state for the branches.

    ``error_type`` names the failure's kind and ``traceback`` its code's
    traceback, if code of the graph raised.
    """

    def __init__(self, message: str, error_type: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.traceback = traceback


class StateCopyError(IsobranchError):
    """The state holds a value that cannot be copied; ``path`` locates it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# -- branches ------------------------------------------------------------------


class BranchTimeout(IsobranchError):
    """A branch ran past its ``branch_timeout``; ``node`` is where it was."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class BranchCancelled(IsobranchError):
    """A branch was stopped because a sibling failed under ``fail_fast``."""


class RetriesStopped(IsobranchError):
    """The fan-out was stopped (its graph closed) while branches waited to be retried."""


class RunCancelled(BaseException):
    """The run was cancelled from outside (its awaiting task was cancelled).

    Deliberately not an ``IsobranchError`` (nor an ``Exception``): no ``except
    Exception`` in a node, a branch or a backend may turn a cancellation into
    an ordinary failure, and what records a run tells it from one. It is
    raised in the thread that runs the graph; the caller that cancelled gets
    ``asyncio.CancelledError`` instead (``ainvoke``, ``astream``, ``aresume``).
    """



class NodePaused(BaseException):
    """The control-flow signal of a pause: a node (or a fan-out's branches) waits for answers.

    A ``BaseException`` like ``RunCancelled``: no ``except Exception`` in a
    node, a branch or a backend may turn a pause into a failure. The run
    turns it into its ``"__interrupt__"``; it never reaches the caller.
    ``interrupts`` are the pending ``interrupts.Interrupt``s; ``point`` is
    where a paused branch resumes (``checkpoint.recorder.ResumePoint``),
    filled in as the signal leaves each level of the step loop.
    """

    def __init__(self, interrupts: list[Any]) -> None:
        super().__init__(", ".join(i.id for i in interrupts))
        self.interrupts = interrupts
        self.point: Any = None


class InterruptUnavailable(IsobranchError):
    """``interrupt()`` was called in a run that cannot pause: it has no checkpointer."""



class JinjaExpressionError(IsobranchError):
    """A Jinja2 expression (an agent in the peer YAML format) failed at run time; the
    message quotes the expression."""


class LoopBodyError(IsobranchError):
    """A while_loop's condition or body node failed; the message names the loop, the
    condition or node and the iteration (counted from 0); the error is the ``__cause__``."""


# -- backends ------------------------------------------------------------------


class BackendError(IsobranchError, RuntimeError):
    """A backend cannot run a fan-out at all (not one branch's failure): it is closed,
    its graph cannot be sent, its workers cannot start, or it broke its contract.

    Also a ``RuntimeError``, which it was before the library had a root class.
    """


class WorkerStartError(BackendError):
    """A worker process (or the fork server) could not be started."""


class DaskUnavailable(BackendError):
    """The Dask cluster cannot be used: extra missing, scheduler unreachable, start failed."""


class InternalError(IsobranchError, RuntimeError):
    """isobranch broke one of its own rules: a bug to report, not a misuse.

    Also a ``RuntimeError``, as Python's own "cannot happen" errors are.
    """


# -- Lua -----------------------------------------------------------------------


class LuaRuntimeError(IsobranchError):
    """Lua code failed to compile or raised; the message keeps Lua's ``chunk:line:``."""


class LuaTimeoutError(LuaRuntimeError):
    """Lua code ran past its timeout (or was stopped); the VM was discarded."""


class LuaMemoryError(LuaRuntimeError):
    """Lua code exceeded the VM's ``max_memory``; the VM was discarded."""


class LuaConversionError(LuaRuntimeError):
    """A value cannot cross the Python/Lua boundary; the message starts with its path."""


class ConversionError(IsobranchError, ValueError):
    """A value cannot cross the Python/Lua boundary; ``path`` locates it.

    Also a ``ValueError``: the value is one the conversion refuses. The Lua
    runtime reports it as a ``LuaConversionError``.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# -- checkpoints ---------------------------------------------------------------


class StateEncodeError(IsobranchError, ValueError):
    """A value cannot be encoded; ``path`` locates it, e.g. ``state['docs'][3]['when']``.

    Paths index dicts by key and lists and tuples by position; a set element
    is written in braces (``state['tags']{Foo()}``). Also a ``ValueError``:
    the value is one the codec refuses.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StateDecodeError(IsobranchError, ValueError):
    """Stored text is not a value the checkpoint codec wrote: malformed or tampered text,
    an unknown tag, or a pickled value while pickle is off.

    Also a ``ValueError``, as ``json.JSONDecodeError`` is.
    """


# -- the regression plugin and the command line ---------------------------------


class CaseFailure(IsobranchError):
    """A regression case failed; ``str()`` is the complete, readable report."""


class StdoutClosed(IsobranchError):
    """The reader of the command's standard output went away (e.g. ``| head``)."""


class CaseRewriteError(IsobranchError):
    """A case file ``--isobranch-update`` cannot write; the message says which and why."""


class UnrecordableValue(IsobranchError, ValueError):
    """A final state value a case file cannot hold (a set, an object …), naming its key."""
