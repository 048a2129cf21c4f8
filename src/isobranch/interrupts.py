"""Pausing a run for an answer: ``interrupt()``, ``Interrupt`` and the scope of one node call.

A node calls ``interrupt(value)``; the k-th call in one run of the node
returns the k-th answer given for it (``resume(run_id, answer=...)``), and
the first call that has no answer yet pauses the run there. The node finds
where it runs through ``_site``, a ``ContextVar`` holding the running
execution context (a ``NodeSite``): a branch sets it once around its whole
run (branch_run.py), the main path around each node call (runner.py). The
site knows which node call is running, and builds that call's
``InterruptScope`` only when the call asks (most never do, and a branch can
be a few microseconds). The variable is set per branch or per call, not per
thread or per VM, and reset right after, so nothing of one branch is ever
seen by the next one a pool thread runs (the thread-local pattern this
project forbids kept a VM alive across branches; a context variable scoped
to one run cannot). Context variables also flow into the asyncio tasks an
``async`` node awaits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from .errors import InterruptUnavailable, NodePaused


class Breakpoint(StrEnum):
    """Where a breakpoint (``compile(interrupt_before=..., interrupt_after=...)``) pauses."""

    BEFORE = "before"
    AFTER = "after"


@dataclass(frozen=True)
class Interrupt:
    """One pending pause of a run: what ``invoke`` returns under ``"__interrupt__"``.

    ``id`` is the stable path that answers name (``approve``,
    ``review[3]/approve``, ``approve#2`` for a node's second call),
    ``value`` what the node asked with (None for a breakpoint), ``node`` the
    node's path and ``branch`` the branch it ran in (None on the main path).
    ``breakpoint`` says the pause is a breakpoint before or after ``node``
    (continued by ``resume(run_id)`` without an answer), None for an
    ``interrupt()`` call.
    """

    id: str
    value: Any
    node: str
    branch: str | None = None
    breakpoint: Breakpoint | None = None

    def to_record(self) -> dict[str, Any]:
        """The interrupt as plain data (what the checkpoint codec stores)."""
        return {"id": self.id, "value": self.value, "node": self.node, "branch": self.branch,
                "breakpoint": None if self.breakpoint is None else str(self.breakpoint)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Interrupt:
        """An interrupt from ``to_record``'s plain data; ``ValueError`` if it is not one."""
        try:
            point = record.get("breakpoint")
            return cls(id=str(record["id"]), value=record.get("value"), node=str(record["node"]),
                       branch=record.get("branch"),
                       breakpoint=None if point is None else Breakpoint(point))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a recorded interrupt: {exc}") from exc


@dataclass(slots=True)
class InterruptSettings:
    """What the nodes of one run may answer from: the run's answers by interrupt id, whether
    it can pause at all (it has a checkpointer), and the main path's breakpoints.

    ``passed`` is the before-breakpoint a resumed run stopped at: the run goes
    on through it once. The settings cross to every backend with the branch
    limits (``BranchLimits.interrupts``), so the answers must pickle.
    """

    allowed: bool = False
    answers: dict[str, Any] = field(default_factory=dict)
    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()
    passed: str | None = None


NO_INTERRUPTS = InterruptSettings()


class NodeSite(Protocol):
    """Where a node runs, as ``interrupt()`` needs it (an ``ExecutionContext`` is one)."""

    branch_name: str | None
    branch_index: int | None
    branch_start: str | None
    interrupts: InterruptSettings

    def path_of(self, node: str) -> str:
        """``node``'s path (``review/approve`` inside subgraph node ``review``)."""
        ...

    def node_call(self) -> InterruptScope | None:
        """The scope of the node call running here now (made on first use); None
        between node calls (a router, a condition)."""
        ...


class InterruptScope:
    """One call of one node: where it runs (its interrupt id) and how often it asked."""

    __slots__ = ("calls", "name", "pending", "refused", "site")

    def __init__(self, site: NodeSite, name: str) -> None:
        self.site = site
        self.name = name
        self.calls = 0
        # The interrupt this call paused at: the step loop pauses even if the node
        # swallowed the signal (a bare ``except:``, a Lua ``pcall``).
        self.pending: Interrupt | None = None
        # Why the call could not pause (no checkpointer): the node's failure, whatever
        # error the node's code (Lua, say) turned it into.
        self.refused: InterruptUnavailable | None = None

    def ask(self, value: Any) -> Any:
        """The answer to this call's next ``interrupt(value)``; pause if there is none yet."""
        if self.pending is not None:  # the node swallowed the pause and asked again
            raise NodePaused([self.pending])
        site = self.site
        self.calls += 1
        path = site.path_of(self.name)
        start = site.branch_start
        # The branch's own name in its fan-out (branch.result_name; this module sits
        # below branch.py, whose results carry interrupts).
        own = start if start is None or site.branch_index is None else \
            f"{start}[{site.branch_index}]"
        base = interrupt_id(path, site.branch_name, start, own)
        interrupt_id_ = base if self.calls == 1 else f"{base}#{self.calls}"
        settings = site.interrupts
        if interrupt_id_ in settings.answers:
            return settings.answers[interrupt_id_]
        if not settings.allowed:
            self.refused = InterruptUnavailable(
                "interrupt() needs a checkpointer to pause the run: compile(checkpointer="
                "SqliteCheckpointer()) or YAML settings.checkpoint")
            raise self.refused
        self.pending = Interrupt(interrupt_id_, value, path, site.branch_name)
        raise NodePaused([self.pending])


_site: ContextVar[NodeSite | None] = ContextVar("isobranch_node_site", default=None)


# Setting and resetting it: the variable's own methods, no wrapper around them (a branch
# calls each once, and a trivial branch costs microseconds). ``enter_site(site)`` makes
# ``site`` the one ``interrupt()`` answers for and returns a token; ``leave_site(token)``
# ends that.
enter_site: Callable[[NodeSite], Token] = _site.set
leave_site: Callable[[Token], None] = _site.reset


def interrupt(value: Any = None) -> Any:
    """Pause the run for an answer, or return the answer a resume gave.

    In a node of a run with a checkpointer: the first time, the run pauses
    here (``invoke`` returns its state with ``"__interrupt__"``); after
    ``resume(run_id, answer=x)`` the node runs again from its start and this
    call returns ``x``. ``value`` (what the person is asked) must be
    storable by the checkpoint codec. Outside a node, a ``RuntimeError``.
    """
    site = _site.get()
    scope = site.node_call() if site is not None else None
    if scope is None:
        raise RuntimeError("interrupt() was called outside a node of a running graph")
    return scope.ask(value)


def interrupt_id(node_path: str, branch: str | None, branch_start: str | None,
                 branch_result: str | None) -> str:
    """The id of a node's first ``interrupt()`` call.

    On the main path the node's path (``approve``, ``review/approve``); in
    a branch, the branch's name, then ``/`` and the node's path unless the
    node is the branch's first node (``approve[3]``, ``prep[3]/approve``).
    ``branch_result`` is the branch's own name in its fan-out
    (``review[3]``), which a subgraph that is the branch's first node shows
    as the start of its inner nodes' paths (``review[3]/approve``).
    """
    if branch is None:
        return node_path
    if node_path == branch_start:
        return branch
    if branch_result is not None and node_path.startswith(branch_result + "/"):
        return branch + node_path[len(branch_result):]
    return f"{branch}/{node_path}"


def pending_ids(interrupts: list[Interrupt]) -> str:
    """The ids of ``interrupts`` as a message lists them."""
    return ", ".join(repr(i.id) for i in interrupts)
