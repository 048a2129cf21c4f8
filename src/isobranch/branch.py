"""One branch of a fan-out as data: its task, its limits, its monitor and its result.

What every backend sends and gets back; the code that runs a branch is
branch_run.py (next to the step loop it drives). A task's graph is typed
as ``BranchGraph``, what a branch and its backend need of the compiled
graph, so this module and the backends below the step loop never import
``compiled.py``: the graph hands them ``run_branch`` itself.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback as traceback_module
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .cancellation import CancelSignal
from .error_kinds import ErrorKind, plain
from .errors import BranchCancelled
from .statecopy import ScalarSnapshot, StateSnapshot

if TYPE_CHECKING:
    from .interrupts import Interrupt, InterruptSettings
    from .retry import RetryPolicy

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ParallelFlowResult(Mapping):
    """What one branch produced.

    ``branch`` is the branch's name within its fan-out (``"score"``,
    ``"score[3]"``): a public field kept under that name, like the
    ``"branch"`` key of events, though internally a branch's identity is
    ``BranchTask.name``/``start``/``index``.
    ``state`` is the branch's final state, or its state as of the failure.
    ``error`` is a message (it must cross process boundaries) naming the
    failing node; ``error_type`` the exception's class name; ``traceback``
    the failure's traceback as text (None when no Python code raised, e.g.
    a worker crash). ``index`` is the item's position for a map branch
    (named ``"target[index]"``), None for a static branch. ``attempts``
    counts the runs of the branch (more than 1 after branch retries);
    ``error_bases`` names the base classes of ``error_type``'s exception,
    nearest first, so a ``retry_on`` name can match a base of a class that
    only exists where the branch ran. ``spans`` are the branch's trace
    spans as plain data (``trace_records.SpanRecord``) on their way back to
    the caller, which takes them out (empty when tracing is off).
    ``reducer_writes`` are the
    ``(key, value)`` updates a successful branch made to reducer keys of the
    state schema, in order (what the fan-in combines); empty for a failed
    branch. ``route`` is what the branch ran, in order (see ``route_step``):
    the names of the nodes that completed, and for each nested fan-out the
    routes of its branches; the regression plugin's graph coverage reads it.
    ``interrupts`` are the pending interrupts of a branch that paused (it
    is then neither a success nor a failure: ``success`` is False,
    ``error_type`` ``"Interrupted"``, ``paused`` True), ``resume_at`` where
    it continues on resume (a ``checkpoint.recorder.ResumePoint``) and
    ``state`` its state as of the pause.
    ``recordings`` are what the branch's recorded nodes recorded (a tape in
    record mode, ``replay.Tape``; None when nothing was recorded), on their way back to the
    run's tape.

    Reads like a dict too: ``result["state"]``, ``result.get("branch")``. A
    key that is not a field name is looked up in the branch's state
    (``result["score"]`` is ``result.state["score"]``; fields win), for
    ``[]``, ``get`` and ``in``. Iterating, ``len``, ``keys()``, ``items()``
    and ``dict(result)`` cover the fields only.
    """

    branch: str
    state: dict = field(default_factory=dict)
    success: bool = True
    error: str | None = None
    error_type: str | None = None
    timed_out: bool = False
    duration_ms: float = 0.0
    isolation: str = "inline"
    worker: str | int | None = None
    node: str | None = None
    index: int | None = None
    traceback: str | None = None
    attempts: int = 1
    error_bases: tuple[str, ...] = ()
    reducer_writes: list[tuple[str, Any]] = field(default_factory=list)
    spans: tuple[Any, ...] = ()
    route: tuple[Any, ...] = ()
    interrupts: tuple[Interrupt, ...] = ()
    resume_at: Any = None  # a checkpoint.recorder.ResumePoint (a layer above this one)
    recordings: dict[str, list[Any]] | None = None

    @property
    def paused(self) -> bool:
        """Whether the branch paused for answers (``interrupts``) instead of ending."""
        return bool(self.interrupts)

    def __post_init__(self) -> None:
        # An ``ErrorKind`` member is stored as its plain string: what users see and pickles.
        if type(self.error_type) is ErrorKind:
            self.error_type = plain(self.error_type)

    def __getitem__(self, key: str) -> Any:
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        state = self.state
        if isinstance(state, dict) and key in state:
            return state[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of every field (the state is copied)."""
        return asdict(self)


def route_step(results: list[ParallelFlowResult]) -> tuple[tuple[str, bool, str | None, tuple], ...]:
    """A fan-out as one step of a route: per branch ``(branch, success, failed node, route)``.

    Plain tuples and strings, not results: a route crosses processes with
    its branch's result and is stored with it in checkpoints, whose codec
    takes plain values only.
    """
    return tuple((r.branch, r.success, r.node, r.route) for r in results)


def without_unsendable_state(result: ParallelFlowResult) -> ParallelFlowResult:
    """``result``, or for a failed branch whose state cannot be pickled, that failure without it.

    A worker process must pickle the result to send it back. A branch that
    failed because of its state (one nested too deeply for Lua, say) must
    still report that failure, naming its node, not a failure to send it.
    """
    if result.success:
        return result
    try:
        pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        reason = ("nested too deeply to pickle" if isinstance(exc, RecursionError)
                  or "recursion" in str(exc) else f"{type(exc).__name__}: {exc}")
        return replace(result, state={},
                       error=f"{result.error} (its state as of the failure is not sent back "
                             f"from the worker: {reason})")
    return result


class BranchGraph(Protocol):
    """What a branch and the backend that runs it need of the compiled graph.

    ``compiled.CompiledGraph`` is one. ``run_branch`` is how a backend runs
    a branch (``branch_run.run_branch`` on this graph): a backend is handed
    the graph in ``open`` (a worker holds its own copy), so nothing below
    the step loop imports the step loop.
    """

    name: str | None
    lua_timeout: float | None
    lua_max_memory: int | None
    variables: dict

    def run_branch(self, task: BranchTask, monitor: BranchMonitor | None = None,
                   watchdog: Watchdog | None = None) -> ParallelFlowResult:
        """Run ``task``'s branch to its fan-in node (or END); failures are results."""
        ...


@dataclass
class BranchLimits:
    """Limits shared by every branch of one fan-out.

    ``branch_max_memory`` (bytes) is enforced by backends that run branches
    in processes of their own; compile refuses it for the others.
    """

    branch_timeout: float | None = None
    fail_fast: bool = False
    branch_max_memory: int | None = None
    # The retry policy of fan-outs whose edge sets none (compile(branch_retry=)).
    branch_retry: RetryPolicy | None = None
    # The run's answers to interrupts and whether it can pause (None: it cannot).
    interrupts: InterruptSettings | None = None


@dataclass
class BranchTask:
    """Plain data describing one branch; backends ship it wherever they run it.

    A branch's identity is ``name``, ``start`` and ``index``: ``start`` is
    its first node, ``index`` the item's position for a map branch (None for
    a static one), and ``name`` what messages and logs call it: ``"score"``,
    ``"score[3]"`` for item 3 of a map, ``"outer[1]/score[3]"`` for a branch
    of a fan-out nested in branch ``outer[1]``. (Its result's
    ``ParallelFlowResult.branch`` is ``result_name(start, index)``, without
    the outer branches.) A map branch also has an ``overlay``: the few keys
    (item and index) laid over the shared ``snapshot``, so no branch carries
    the whole list. ``stop`` is the run's stop flag, seen only by branches
    that run in this process (it is not part of the payload): ``close()``
    raises it to end a node retry's backoff at once. ``trace`` is the fan-out
    span the branch's spans go under (``trace_records.TraceParent``); None
    when tracing is off. ``resume_at`` is where a branch that paused
    continues on resume (its ``snapshot`` is then its state as of the pause,
    with no overlay), and ``route`` what it ran before the pause.
    ``replay`` is the run's tape of recorded nodes (``replay.Tape``); None:
    they run live.
    """

    graph: BranchGraph
    name: str
    start: str
    fan_in: str
    snapshot: StateSnapshot
    limits: BranchLimits
    isolation: str
    index: int | None = None
    overlay: StateSnapshot | ScalarSnapshot | None = None
    stop: CancelSignal | None = None
    trace: Any = None
    resume_at: Any = None  # a checkpoint.recorder.ResumePoint
    route: tuple[Any, ...] = ()
    replay: Any = None

    def initial_state(self) -> dict:
        """A new private copy of the state this branch starts from."""
        state = self.snapshot.copy()
        if self.overlay is not None:
            state.update(self.overlay.copy())
        return state

    def payload(self) -> dict[str, Any]:
        """Every field but the graph (which workers already hold): ``BranchTask(graph=g, **p)``."""
        return {"name": self.name, "start": self.start, "fan_in": self.fan_in,
                "snapshot": self.snapshot, "limits": self.limits, "isolation": self.isolation,
                "index": self.index, "overlay": self.overlay, "trace": self.trace,
                "resume_at": self.resume_at, "route": self.route,
                "replay": self.replay}


@dataclass(slots=True, eq=False)
class BranchRun:
    """One attempt of one branch of a running fan-out, as the fan-out driver hands it to a backend.

    ``position`` is the branch's place in the fan-out and ``attempt`` counts
    its runs (2 and up: a retry). The backend sets ``started_at``
    (``time.monotonic()``) when the branch really starts (the driver counts
    its deadline from then) and may keep its own bookkeeping in ``handle``.
    The driver sets ``done`` once it has the run's result, and drops any
    later report of it (a kill that raced the branch's own finish).
    """

    task: BranchTask
    position: int
    attempt: int = 1
    started_at: float | None = None
    handle: Any = None
    done: bool = False


def result_name(start: str, index: int | None) -> str:
    """A branch's name within its own fan-out: ``start`` for a static branch,
    ``"start[index]"`` for a map branch (``ParallelFlowResult.branch``)."""
    return start if index is None else f"{start}[{index}]"


class BranchMonitor:
    """Live view of a running branch for an in-process backend.

    The backend reads ``started_at``/``node`` to judge and report a timeout,
    and cancels ``cancelled`` so the branch stops: at its next node boundary,
    in Lua at once, in an awaited node at its ``await``, and in the waits of
    its own nested fan-outs.
    """

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.node: str | None = None
        self.state: dict | None = None
        self.cancelled = CancelSignal("the branch was cancelled", BranchCancelled)


class Watchdog(Protocol):
    """Someone outside the running code who enforces its time limits.

    A branch in a worker process runs Lua without a count hook; it tells the
    watchdog (its parent process) where it is and when each Lua call must
    end, and the watchdog ends the worker if a deadline passes.
    """

    def node_started(self, node: str) -> None:
        """``node`` is about to run."""

    def node_merged(self, node: str, update: dict) -> None:
        """``node`` returned ``update``, now merged into the branch state."""

    def lua_started(self, chunk: str, deadline: float, limit: float | None,
                    branch_deadline: bool) -> None:
        """A Lua call named ``chunk`` starts; it must end by ``deadline`` (``time.monotonic``).

        ``branch_deadline`` tells whether the deadline is the branch's own
        (a branch timeout) rather than the Lua timeout.
        """

    def lua_finished(self) -> None:
        """The Lua call returned (or raised)."""


def format_traceback(exc: BaseException) -> str:
    """``exc``'s traceback (with its causes) as text that can cross process boundaries."""
    return "".join(traceback_module.format_exception(exc))


def failed_result(task: BranchTask, error: str, error_type: str, **details: Any
                  ) -> ParallelFlowResult:
    """A failed result of ``task``'s branch, named and indexed like every other.

    Every result built for a branch that did not finish on its own (cancelled,
    timed out, out of memory) comes from here, so a map branch is
    ``"work[3]"`` with ``index == 3`` whatever stopped it. ``details`` are
    the other fields (``state``, ``node``, ``worker`` …).
    """
    details.setdefault("isolation", task.isolation)
    return ParallelFlowResult(branch=result_name(task.start, task.index), index=task.index,
                              success=False, error=error, error_type=error_type, **details)


def cancelled_result(task: BranchTask, reason: str) -> ParallelFlowResult:
    """The result of a branch that was stopped (or never started) because of ``reason``."""
    return failed_result(task, reason, CANCELLED)


# ``error_type`` of a branch stopped because of another one; never a cause itself.
CANCELLED = ErrorKind.CANCELLED


def timed_out_result(task: BranchTask, monitor: BranchMonitor | None) -> ParallelFlowResult:
    """The result of a branch the backend gave up waiting for after ``branch_timeout``."""
    node = monitor.node if monitor else None
    where = f" in node {node!r}" if node else ""
    started = monitor.started_at if monitor and monitor.started_at else time.monotonic()
    state = dict(monitor.state) if monitor and monitor.state is not None else {}
    return failed_result(
        task, f"branch {task.name!r} timed out after {task.limits.branch_timeout:g}s{where}",
        ErrorKind.BRANCH_TIMEOUT, state=state, timed_out=True, duration_ms=ms_since(started),
        worker=None, node=node)


def ms_since(started: float) -> float:
    """Milliseconds since the monotonic time ``started``."""
    return (time.monotonic() - started) * 1000.0

