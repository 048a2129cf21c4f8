"""Planning fan-outs: static parallel edges and map edges, and the branch tasks they start.

A static fan-out starts one branch per parallel edge; a map fan-out one
branch per item of a list known only at run time. ``plan_fan_out`` decides
which branches there are and with what input, and nothing else: running
them is the fan-out driver's (``fanout_run``). Tasks are built lazily, one
at a time as the driver takes the next, so a map over 100,000 items never
holds 100,000 built inputs. The state is snapshotted once per fan-out (for
a map: without the list it maps over); each map task adds only its item
and index on top of that shared snapshot, so a map's total copying is
O(n), not O(n²).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from .branch import BranchLimits, BranchTask, format_traceback, result_name
from .cancellation import CancelSignal
from .conditions import Expression
from .error_kinds import ErrorKind
from .errors import (
    BranchCancelled,
    BranchTimeout,
    FanOutPlanError,
    GraphExecutionError,
    MapOverError,
    StateCopyError,
)
from .statecopy import StateSnapshot, find_unpicklable, snapshot_of

if TYPE_CHECKING:
    from .branch import BranchGraph
    from .context import ExecutionContext
    from .retry import RetryPolicy


@dataclass(frozen=True)
class StaticFanOut:
    """One branch per parallel edge, in declaration order."""

    targets: tuple[str, ...]
    fan_in: str
    max_concurrency: int | None = None
    # The retry policy of each parallel edge, in target order (None: the default).
    retries: tuple[RetryPolicy | None, ...] = ()

    def retry_of(self, position: int) -> RetryPolicy | None:
        """The retry policy the edge of branch ``position`` sets, if any."""
        return self.retries[position] if position < len(self.retries) else None


@dataclass(frozen=True)
class MapFanOut:
    """One branch per item of ``over`` (a state key, an ``Expression`` or a callable)."""

    target: str
    fan_in: str
    over: str | Expression | Callable[[dict], Any]
    item_key: str = "item"
    index_key: str = "index"
    max_concurrency: int | None = None
    retry: RetryPolicy | None = None
    # A failed branch cancels the branches not yet handed out; the run goes on to the fan-in.
    cancel_unstarted_on_failure: bool = False

    def retry_of(self, position: int) -> RetryPolicy | None:
        """The retry policy of the map edge (every branch has the same)."""
        return self.retry

    def describe_over(self) -> str:
        """``over`` as messages show it: ``'docs'``, ``python: expr``, ``lua: expr``."""
        if isinstance(self.over, str):
            return repr(self.over)
        if isinstance(self.over, Expression):
            return self.over.describe()
        return f"callable {getattr(self.over, '__name__', type(self.over).__name__)}"


FanOut = StaticFanOut | MapFanOut


def map_items(fan_out: MapFanOut, state: dict, context: ExecutionContext) -> Sequence[Any]:
    """The items a map fans out over, for ``state``; ``MapOverError`` if they are not a list."""
    over = fan_out.over
    if isinstance(over, str):
        if over not in state:
            raise MapOverError(f"map over {over!r}: the state has no key {over!r}")
        items = state[over]
        if not isinstance(items, (list, tuple)):
            raise MapOverError(f"map over {over!r}: state[{over!r}] must be a list or tuple, "
                               f"got {type(items).__name__}")
        return items
    if isinstance(over, Expression):
        items = over.evaluate(state, context)
        if isinstance(items, dict) and not items:
            items = []  # Lua has one kind of table: an empty one converts to {}
    else:
        items = context.resolve(over(state))
        if not isinstance(items, (list, tuple, str, bytes, dict)) and hasattr(items, "__iter__"):
            items = list(items)  # a callable may give any iterable (a generator, a range)
    if not isinstance(items, (list, tuple)):
        raise MapOverError(f"map over {fan_out.describe_over()}: must give a list or tuple, "
                           f"got {type(items).__name__}")
    return items


def map_base_state(fan_out: MapFanOut, state: dict) -> dict:
    """What every map branch starts from: the state without the key it maps over."""
    if isinstance(fan_out.over, str):
        return {key: value for key, value in state.items() if key != fan_out.over}
    return state


@dataclass
class FanOutPlan:
    """The branches of one fan-out: how many, their names, and their tasks (built lazily)."""

    total: int
    names: Callable[[int], str]
    indexes: Callable[[int], int | None]
    tasks: Iterator[BranchTask]


def static_plan(graph: BranchGraph, fan_out: StaticFanOut, snapshot: StateSnapshot,
                limits: BranchLimits, isolation: str, parent: str | None,
                stop: CancelSignal | None = None) -> FanOutPlan:
    """The plan of a static fan-out from ``snapshot``; ``stop`` is the run's stop flag."""
    targets = fan_out.targets

    def tasks() -> Iterator[BranchTask]:
        for target in targets:
            yield BranchTask(graph=graph, name=_full_name(parent, target), start=target,
                             fan_in=fan_out.fan_in, snapshot=snapshot, limits=limits,
                             isolation=isolation, stop=stop)

    return FanOutPlan(len(targets), lambda position: targets[position], lambda _: None, tasks())


def map_plan(graph: BranchGraph, fan_out: MapFanOut, items: Sequence[Any],
             snapshot: StateSnapshot, limits: BranchLimits, isolation: str, parent: str | None,
             *, must_pickle: bool, stop: CancelSignal | None = None) -> FanOutPlan:
    """The plan of a map fan-out over ``items`` from ``snapshot`` (the state without the list).

    Each task is built when it is asked for; its item is copied then (and
    must pickle when ``must_pickle``, or ``StateCopyError`` names its path).
    """
    target, item_key, index_key = fan_out.target, fan_out.item_key, fan_out.index_key
    where = (f"state[{fan_out.over!r}]" if isinstance(fan_out.over, str)
             else f"items of {fan_out.describe_over()}")

    def tasks() -> Iterator[BranchTask]:
        for index, item in enumerate(items):
            try:
                overlay = snapshot_of({item_key: item, index_key: index})
            except StateCopyError as exc:
                path, reason = find_unpicklable(item, f"{where}[{index}]")
                raise StateCopyError(path, reason or exc.reason) from exc
            if must_pickle and not overlay.picklable:
                path, reason = find_unpicklable(item, f"{where}[{index}]")
                raise StateCopyError(path, reason or "cannot be pickled")
            yield BranchTask(graph=graph, name=_full_name(parent, result_name(target, index)),
                             start=target, fan_in=fan_out.fan_in, snapshot=snapshot,
                             limits=limits, isolation=isolation, index=index, overlay=overlay,
                             stop=stop)

    return FanOutPlan(len(items), lambda position: result_name(target, position),
                      lambda position: position, tasks())


def _full_name(parent: str | None, name: str) -> str:
    """``name`` of a branch of a fan-out nested in the branch named ``parent``: ``parent/name``."""
    return f"{parent}/{name}" if parent else name


def _failure_site(over: object, error: BaseException) -> str:
    """`` (at agent.yaml:16, line 2 of its code)`` if ``over``, read from a file, raised
    ``error``; it ends the message, so text that matched a message before still does."""
    site = over.failure_site(error) if isinstance(over, Expression) else None
    return f" ({site})" if site is not None else ""


def plan_fan_out(graph: BranchGraph, fan_out: FanOut, state: dict, context: ExecutionContext,
                 *, isolation: str, crosses_processes: bool) -> FanOutPlan:
    """The plan of ``fan_out`` from ``state`` for a backend named ``isolation``.

    A map's items are read (its ``over`` runs now); the state is
    snapshotted once and, when branches run in other processes, checked to
    pickle (and each map item as its task is built). ``FanOutPlanError``
    says what failed; a timeout or cancellation of the context, or a failed
    run, raises as it is.
    """
    base = state
    items: Sequence[Any] = ()
    if isinstance(fan_out, MapFanOut):
        try:
            items = map_items(fan_out, state, context)
        except (BranchTimeout, BranchCancelled, GraphExecutionError):
            raise
        except Exception as exc:
            detail = str(exc) if isinstance(exc, MapOverError) else (
                f"map over {fan_out.describe_over()} failed: {type(exc).__name__}: {exc}"
                f"{_failure_site(fan_out.over, exc)}")
            raise FanOutPlanError(detail, type(exc).__name__, format_traceback(exc)) from exc
        base = map_base_state(fan_out, state)
    try:
        snapshot = StateSnapshot(base)
    except StateCopyError as exc:
        raise FanOutPlanError(f"cannot copy the state for its branches: {exc}",
                              ErrorKind.STATE_COPY_ERROR) from exc
    if crosses_processes and not snapshot.picklable:
        path, reason = find_unpicklable(base, "state")
        raise FanOutPlanError(f"the state cannot be sent to {isolation!r} workers: "
                              f"{path}: {reason}", ErrorKind.STATE_COPY_ERROR)
    limits = context.fan_out_limits
    if isinstance(fan_out, MapFanOut):
        return map_plan(graph, fan_out, items, snapshot, limits, isolation, context.scope,
                        must_pickle=crosses_processes, stop=context.stop)
    return static_plan(graph, fan_out, snapshot, limits, isolation, context.scope,
                       stop=context.stop)


def print_branch_tracebacks(exc: BaseException, out: TextIO, *, limit: int = 5) -> None:
    """Write where ``exc`` (a failed run) came from in the code: its failing code's
    traceback, then those of failed branches (at most ``limit``), wherever they ran."""
    text = getattr(exc, "traceback", None)
    if text:
        print(f"traceback of the failing code ({getattr(exc, 'branch', None) or 'main path'}):",
              file=out)
        print(text.rstrip(), file=out)
    failed = [r for r in getattr(exc, "results", None) or []
              if not r.success and r.traceback and r.traceback != text]
    for result in failed[:limit]:
        print(f"traceback of branch {result.branch!r} ({result.isolation}, worker "
              f"{result.worker}):", file=out)
        print(result.traceback.rstrip(), file=out)
    if len(failed) > limit:
        print(f"... and {len(failed) - limit} more failed branches with tracebacks", file=out)
