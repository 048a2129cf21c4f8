"""The execution context: everything one invocation or one branch owns.

A context is created per ``invoke`` and per branch and passed explicitly to
every node; it owns one lazily created Lua VM that its sequential nodes
share and that dies with it. Nothing here lives in a thread-local, so a
reused pool thread can never see a previous branch's VM.

A context sits below everything that runs code in it (nodes, the step
loop, the backends): it is handed the graph as a ``branch.BranchGraph``,
its fan-outs' backend as whatever its creator made (a type parameter) and
the run's step recorder as an opaque value the step loop reads, and
imports none of their modules.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .async_nodes import AwaitRunner
from .errors import BranchCancelled, BranchTimeout, InternalError, LuaTimeoutError
from .interrupts import NO_INTERRUPTS, InterruptScope, InterruptSettings, interrupt
from .lua.runtime import LuaRuntime

if TYPE_CHECKING:
    from .branch import BranchGraph, BranchLimits, BranchMonitor, Watchdog
    from .cancellation import CancelSignal
    from .trace_records import Spans


class FanOutBackend(Protocol):
    """What a context knows of the backend its fan-outs run on: its name, and that it
    closes (``isolation.base.IsolationBackend`` is one; the step loop uses the rest)."""

    name: str

    def close(self) -> None: ...


BackendT = TypeVar("BackendT", bound=FanOutBackend)


# What ``ExecutionContext.enter_subgraph`` set aside, for ``leave_subgraph`` to restore:
# the graph, recorder, Lua VM, node, reducer writes, prefix, scope and whether merges
# are reported. (A plain tuple: one is made per subgraph run.)
SubgraphScope = tuple[Any, Any, "LuaRuntime | None", "str | None",
                      "list[tuple[str, Any]] | None", str, "str | None", bool]


class ExecutionContext(Generic[BackendT]):
    """State of one invocation or one branch: Lua VM, deadline, fan-out backend.

    ``BackendT`` is the type of the backend it holds for its fan-outs (the
    step loop's ``IsolationBackend``), handed in or made by
    ``backend_factory`` and handed back by ``fan_out_backend``.
    """

    # What most contexts never change is read from the class until one sets its own:
    # a context is made for every branch, and a trivial branch costs microseconds.
    # The branch's first node (BranchTask.start), which its interrupt ids leave out.
    branch_start: str | None = None
    # The running node's path (enter_node), for messages.
    node: str | None = None
    _lua: LuaRuntime | None = None
    _lua_call: tuple[str, float | None, bool] = ("lua", None, False)
    _awaiter: AwaitRunner | None = None
    # Inside a subgraph node: what its inner nodes' names are shown under (``review/``).
    prefix = ""
    # Whether merged updates are this branch's own (the watchdog rebuilds its state
    # from them); a subgraph's inner state is private, so never its.
    _reports_merges = True
    # Who traces this path's nodes and fan-outs (tracing.py, trace_records.py); None: off.
    spans: Spans | None = None
    # The run's tape of recorded nodes (a replay.Tape, which sits above this module);
    # None: they run live.
    replay: Any = None
    # The node whose call is running now (its name; the step loop sets it around the
    # call), None between calls; and that call's interrupt scope, made only by its
    # first interrupt() (node_call), since most calls never ask.
    calling: str | None = None
    calling_scope: InterruptScope | None = None
    # Whether interrupt() already finds this context (interrupts.enter_site) for as long
    # as it runs: a branch's, set once for the branch; else each node call sets it.
    is_running_site = False

    def __init__(self, graph: BranchGraph, *, deadline: float | None = None,
                 branch_name: str | None = None, monitor: BranchMonitor | None = None,
                 time_limit: float | None = None, backend: BackendT | None = None,
                 nested_isolation: str = "thread", max_workers: int | None = None,
                 fan_out_limits: BranchLimits, watchdog: Watchdog | None = None,
                 max_concurrency: int | None = None, cancel: CancelSignal | None = None,
                 stop: CancelSignal | None = None,
                 recorder: Any = None,
                 backend_factory: Callable[..., BackendT] | None = None,
                 branch_index: int | None = None) -> None:
        self.graph = graph
        # Makes the backend of a branch's own fan-outs (see fan_out_backend).
        self._backend_factory = backend_factory
        # The run's cancellation signal (main path of an async run only).
        self.cancel = cancel
        # Set by CompiledGraph.close() to end a retry's backoff in this run at
        # once (in-process branches see it too); None in a worker process.
        self.stop = stop
        # Records the main path of a checkpointed run (a checkpoint.recorder.RunRecorder,
        # which the step loop uses: the context only carries and swaps it); None in branches.
        self.recorder = recorder
        self.deadline = deadline
        self.time_limit = time_limit
        # The branch's name (BranchTask.name); None on the main path.
        self.branch_name = branch_name
        # The item's position in a map branch (BranchTask.index).
        self.branch_index = branch_index
        # The run's answers to interrupts, whether it can pause, its breakpoints.
        self.interrupts: InterruptSettings = (
            fan_out_limits.interrupts if fan_out_limits.interrupts is not None
            else NO_INTERRUPTS)
        self.monitor = monitor
        self.max_workers = max_workers
        # Branches of one fan-out running at once, unless its edge says otherwise.
        self.max_concurrency = max_concurrency
        self.fan_out_limits = fan_out_limits
        self._backend = backend
        self._owns_backend = backend is None
        self._nested_isolation = nested_isolation
        self.watchdog = watchdog
        # A branch's writes to reducer keys, in order, for its fan-in (None on the main path).
        self.reducer_writes: list[tuple[str, Any]] | None = [] if branch_name is not None else None
        # What the branches of its fan-outs are named under (inside a subgraph node too).
        self.scope: str | None = branch_name

    def enter_subgraph(self, graph: BranchGraph, shown: str, *, branch_itself: bool,
                       recorder: Any = None) -> SubgraphScope:
        """Run subgraph node ``shown`` (``review``, ``review[3]``) in this context, until
        ``leave_subgraph`` with what this returns.

        Meanwhile its nodes are named ``shown/node``, it runs on ``graph``'s
        Lua VM of its own (the inner graph's limits and variables), its merges
        are no reducer writes of the branch nor updates the watchdog sees, and
        ``recorder`` records its steps; deadline, cancellation, watchdog and
        the backend and limits of its fan-outs stay the outer run's.
        ``branch_itself``: the subgraph node is the branch's first node, so
        its branches' names are not nested under ``shown`` again. (One
        context, not a new one per subgraph run: a subgraph per map item must
        cost little.)
        """
        saved = (self.graph, self.recorder, self._lua, self.node, self.reducer_writes,
                 self.prefix, self.scope, self._reports_merges)
        self.graph = graph
        self.recorder = recorder
        self._lua = None
        self.reducer_writes = None
        self.prefix = self.prefix + shown + "/"
        if not branch_itself:
            self.scope = self.scope + "/" + shown if self.scope else shown
        self._reports_merges = False
        return saved

    def leave_subgraph(self, saved: SubgraphScope) -> None:
        """Back to the graph ``enter_subgraph`` left; the subgraph's Lua VM is closed."""
        if self._lua is not None:
            self._lua.close()
        (self.graph, self.recorder, self._lua, self.node, self.reducer_writes, self.prefix,
         self.scope, self._reports_merges) = saved

    def path_of(self, node: str) -> str:
        """``node`` as messages and events name it: ``review/score`` inside subgraph ``review``."""
        return self.prefix + node if self.prefix else node

    def node_call(self) -> InterruptScope | None:
        """The interrupt scope of the node call running now, made by its first
        ``interrupt()``; None between node calls (``interrupts.NodeSite``)."""
        if self.calling is None:
            return None
        if self.calling_scope is None:
            self.calling_scope = InterruptScope(self, self.calling)
        return self.calling_scope

    @property
    def isolation(self) -> str:
        """Name of the backend this context's fan-outs run on."""
        return self._backend.name if self._backend is not None else self._nested_isolation

    @property
    def lua(self) -> LuaRuntime:
        """This context's Lua VM, created on first use."""
        if self._lua is None:
            # A branch's Lua stops when the branch is cancelled or out of time,
            # the main path's when the run is cancelled.
            stop = self.monitor.cancelled.is_set if self.monitor is not None else (
                self.cancel.is_set if self.cancel is not None else None)
            # Under a watchdog no hook is installed: Lua runs at bare speed and
            # the watchdog ends the whole worker when a deadline passes.
            self._lua = LuaRuntime(timeout=self.graph.lua_timeout,
                                   max_memory=self.graph.lua_max_memory, should_stop=stop,
                                   timeout_hook=self.watchdog is None,
                                   deadline_listener=(self._lua_deadline if self.watchdog
                                                      is not None else None),
                                   interrupt=interrupt)
        return self._lua

    def enter_node(self, node: str) -> None:
        """Record the running node; stop here if the branch is out of time or cancelled."""
        if self.prefix:
            node = self.prefix + node
        self.node = node
        if self.cancel is not None:
            self.cancel.raise_if_set()
        if self.watchdog is not None:
            self.watchdog.node_started(node)
        if self.monitor is not None:
            self.monitor.node = node
            if self.monitor.cancelled.is_set():
                raise BranchCancelled(f"branch {self.branch_name!r} cancelled before node {node!r}")
        if self.deadline is not None and time.monotonic() >= self.deadline:  # check_deadline
            raise self._timeout(node)

    def stop_flags(self) -> list[CancelSignal]:
        """The signals that end this context's backoffs: the run's cancellation, the
        graph's close(), the branch's cancel."""
        flags = [flag for flag in (self.cancel, self.stop) if flag is not None]
        if self.monitor is not None:
            flags.append(self.monitor.cancelled)
        return flags

    def cancelled_reason(self) -> str | None:
        """Why this context must stop now (cancelled branch, closed graph), or None."""
        if self.monitor is not None and self.monitor.cancelled.is_set():
            return f"branch {self.branch_name!r} cancelled in node {self.node!r}"
        if self.stop is not None and self.stop.is_set():
            where = f"branch {self.branch_name!r}" if self.branch_name else "the run"
            return f"{where} stopped in node {self.node!r}: the graph was closed"
        return None

    def check_deadline(self) -> None:
        """Raise ``BranchTimeout`` (naming the current node) if the branch is out of time."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self._timeout(self.node)

    def run_lua(self, method: str, code: str, state: dict, *, chunk_name: str) -> Any:
        """Call ``LuaRuntime.<method>`` with the Lua timeout cut to the branch deadline."""
        runtime = self.lua
        limit = self.graph.lua_timeout
        cut_by_deadline = False
        if self.deadline is not None:
            remaining = max(self.deadline - time.monotonic(), 0.001)
            if limit is None or remaining < limit:
                limit, cut_by_deadline = remaining, True
        self._lua_call = (chunk_name, limit, cut_by_deadline)
        try:
            return getattr(runtime, method)(code, state, variables=self.graph.variables,
                                            chunk_name=chunk_name, timeout=limit)
        except LuaTimeoutError as exc:
            if self.cancel is not None and self.cancel.is_set():
                raise self.cancel.error() from exc
            if self.monitor is not None and self.monitor.cancelled.is_set():
                raise BranchCancelled(f"branch {self.branch_name!r} cancelled in node "
                                      f"{self.node!r}") from exc
            if cut_by_deadline:
                raise self._timeout(self.node) from exc
            raise

    @property
    def fan_out_cancel(self) -> CancelSignal | None:
        """What stops this context's fan-outs: the run's signal, or its branch's own."""
        if self.cancel is not None:
            return self.cancel
        return self.monitor.cancelled if self.monitor is not None else None

    def resolve(self, value: Any) -> Any:
        """``value``, or if it is awaitable (an ``async def`` node's result) what it gives.

        It is awaited on this context's own event loop, which stops it when
        the branch or run is cancelled or out of time.
        """
        # What nodes return is almost always a plain dict or None, never awaitable:
        # answered without isawaitable's Awaitable check, once per node of every branch.
        if value is None or type(value) is dict or not inspect.isawaitable(value):
            return value
        if self._awaiter is None:

            self._awaiter = AwaitRunner(self.stop_reason)
        return self._awaiter.run(value)

    def stop_reason(self) -> BaseException | None:
        """Why the running code must stop now (run or branch cancelled, out of time), or None."""
        if self.cancel is not None and self.cancel.is_set():
            return self.cancel.error()
        if self.monitor is not None and self.monitor.cancelled.is_set():
            return BranchCancelled(f"branch {self.branch_name!r} cancelled in node {self.node!r}")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return self._timeout(self.node)
        return None

    def _lua_deadline(self, deadline: float | None) -> None:
        # Called by the runtime right around the Lua call itself, so the time
        # spent converting the state in and out is not charged to Lua.
        assert self.watchdog is not None
        if deadline is None:
            self.watchdog.lua_finished()
        else:
            chunk, limit, cut_by_deadline = self._lua_call
            self.watchdog.lua_started(chunk, deadline, limit, cut_by_deadline)

    def merged(self, node: str, update: dict) -> None:
        """``node``'s update has been merged into the state (reported to the watchdog)."""
        if self.watchdog is not None and self._reports_merges:
            self.watchdog.node_merged(node, update)

    def fan_out_backend(self) -> BackendT:
        """The backend for fan-outs started from this context.

        The main path uses the compiled graph's pooled backend; a branch runs
        its nested fan-outs on a backend of its own that dies with it.
        """
        if self._backend is None:
            if self._backend_factory is None:
                raise InternalError("this execution context was given neither a backend nor a "
                                   "backend factory, so it cannot fan out")
            self._backend = self._backend_factory(self._nested_isolation,
                                                  max_workers=self.max_workers)
        return self._backend

    def _timeout(self, node: str | None) -> BranchTimeout:
        where = f" in node {node!r}" if node else ""
        limit = f" after {self.time_limit:g}s" if self.time_limit else ""
        return BranchTimeout(f"branch {self.branch_name!r} timed out{limit}{where}", node)

    def close(self) -> None:
        """Drop the Lua VM, the event loop of async nodes and any backend this context created."""
        if self._awaiter is not None:
            self._awaiter.close()
            self._awaiter = None
        if self._lua is not None:
            self._lua.close()
            self._lua = None
        if self._owns_backend and self._backend is not None:
            self._backend.close()
            self._backend = None
