"""Fan-outs: static parallel edges and map edges, and the branch tasks they start.

A static fan-out starts one branch per parallel edge; a map fan-out one
branch per item of a list known only at run time. Tasks are built lazily,
one at a time as a backend asks for the next, so a map over 100,000 items
never holds 100,000 built inputs. The state is snapshotted once per fan-out
(for a map: without the list it maps over); each map task adds only its
item and index on top of that shared snapshot, so a map's total copying is
O(n), not O(n²).

``Gathered`` applies the fail-fast rule and places results by position; the
runner and the backends' list-returning ``run_branches`` both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from .branch import (
    CANCELLED,
    BranchLimits,
    BranchTask,
    ParallelFlowResult,
    branch_name,
)
from .cancellation import CancelSignal
from .conditions import Expression
from .errors import BackendError, MapOverError, StateCopyError
from .statecopy import StateSnapshot, find_unpicklable, snapshot_of

if TYPE_CHECKING:
    from .compiled import CompiledGraph
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


def static_plan(graph: CompiledGraph, fan_out: StaticFanOut, snapshot: StateSnapshot,
                limits: BranchLimits, isolation: str, parent: str | None,
                stop: CancelSignal | None = None) -> FanOutPlan:
    """The plan of a static fan-out from ``snapshot``; ``stop`` is the run's stop flag."""
    targets = fan_out.targets

    def tasks() -> Iterator[BranchTask]:
        for target in targets:
            yield BranchTask(graph=graph, branch=target, fan_in=fan_out.fan_in,
                             snapshot=snapshot, limits=limits, isolation=isolation,
                             path=_path(parent, target), stop=stop)

    return FanOutPlan(len(targets), lambda position: targets[position], lambda _: None, tasks())


def map_plan(graph: CompiledGraph, fan_out: MapFanOut, items: Sequence[Any],
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
            name = branch_name(target, index)
            yield BranchTask(graph=graph, branch=target, fan_in=fan_out.fan_in,
                             snapshot=snapshot, limits=limits, isolation=isolation,
                             path=_path(parent, name), index=index, overlay=overlay,
                             stop=stop)

    return FanOutPlan(len(items), lambda position: branch_name(target, position),
                      lambda position: position, tasks())


def _path(parent: str | None, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def triggers_fail_fast(result: ParallelFlowResult) -> bool:
    """The fail-fast rule: a failed branch stops its siblings, unless it was itself cancelled."""
    return not result.success and result.error_type != CANCELLED


def fail_fast_reason(failure: ParallelFlowResult) -> str:
    """Why the siblings of ``failure`` were cancelled (every backend says the same)."""
    return f"cancelled: branch {failure.branch!r} failed first (fail_fast)"


class Gathered:
    """Results of one fan-out placed by position, with the fail-fast rule applied once.

    ``add`` returns True when the fan-out must stop (fail_fast and a real
    failure); ``finish`` fills every branch that has no result with a
    cancelled one and returns them all in position order.
    """

    def __init__(self, total: int, fail_fast: bool, backend: str) -> None:
        self.results: list[ParallelFlowResult | None] = [None] * total
        self.fail_fast = fail_fast
        self.backend = backend
        self.done = 0
        self.failed = 0
        self.failure: ParallelFlowResult | None = None

    def add(self, position: int, result: ParallelFlowResult) -> bool:
        """Record ``result`` for ``position``; True if the fan-out must stop now."""
        if not isinstance(position, int) or not 0 <= position < len(self.results):
            raise BackendError(f"backend {self.backend!r} reported a result for branch "
                               f"position {position!r} of {len(self.results)}")
        if self.results[position] is not None:
            raise BackendError(f"backend {self.backend!r} reported branch {position} twice")
        if not isinstance(result, ParallelFlowResult):
            raise BackendError(f"backend {self.backend!r} returned a {type(result).__name__} "
                               f"instead of a ParallelFlowResult")
        self.results[position] = result
        self.done += 1
        if not result.success:
            self.failed += 1
        if self.fail_fast and self.failure is None and triggers_fail_fast(result):
            self.failure = result
            return True
        return False

    def missing(self) -> list[int]:
        """Positions that have no result."""
        return [i for i, result in enumerate(self.results) if result is None]

    def finish(self, names: Callable[[int], str], indexes: Callable[[int], int | None],
               isolation: str) -> list[ParallelFlowResult]:
        """Every result in order; branches without one are cancelled (after a fail_fast stop)."""
        if self.failure is not None:
            reason = fail_fast_reason(self.failure)
            for position in self.missing():
                self.results[position] = ParallelFlowResult(
                    branch=names(position), index=indexes(position), success=False,
                    error=reason, error_type=CANCELLED, isolation=isolation)
        missing = self.missing()
        if missing:
            raise BackendError(f"backend {self.backend!r} returned {self.done} results for "
                               f"{len(self.results)} branches (none for "
                               f"{', '.join(names(i) for i in missing[:5])}"
                               f"{', ...' if len(missing) > 5 else ''})")
        return [result for result in self.results if result is not None]


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


def run_in_order(stream: Iterator[tuple[int, ParallelFlowResult]],
                 tasks: list[BranchTask]) -> list[ParallelFlowResult]:
    """A streaming backend's ``run_branches``: every result in task order, fail_fast applied."""
    if not tasks:
        return []
    gathered = Gathered(len(tasks), tasks[0].limits.fail_fast, tasks[0].isolation)
    try:
        for position, result in stream:
            if gathered.add(position, result):
                break
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return gathered.finish(lambda i: tasks[i].name, lambda i: tasks[i].index,
                           tasks[0].isolation)
