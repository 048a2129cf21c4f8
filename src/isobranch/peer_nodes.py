"""Node kinds only the_edge_agent's YAML format has: ``type: while_loop`` and ``output:``.

A ``WhileLoopNode`` runs its body nodes in order, again and again, while its
condition holds, at most ``max_iterations`` times, as one step of the graph:
the format defines the loop as one node, so its iterations are not steps of
their own (no events, checkpoints or breakpoints between them). A
``ResultUnderKey`` node stores what its code returned under one state key,
and a ``PeerPythonNode`` has the globals that format gives Python code.
Both are plain picklable objects like the nodes they hold, so they run on
every backend.
"""

from __future__ import annotations

import datetime
import json
import types
from typing import TYPE_CHECKING, Any

from .conditions import Condition
from .errors import BranchCancelled, BranchTimeout, GraphExecutionError, LoopBodyError
from .keys import Language
from .nodes import Node, PythonNode

if TYPE_CHECKING:
    from .branch import ParallelFlowResult
    from .context import ExecutionContext

# What ends a run or pauses it rather than failing the body: passed on as it is.
_NOT_THE_BODYS_FAILURE = (BranchTimeout, BranchCancelled, GraphExecutionError)
# The bounds the format puts on a loop's max_iterations.
MIN_ITERATIONS = 1
MAX_ITERATIONS = 1000


class WhileLoopNode(Node):
    """the_edge_agent's ``type: while_loop``: ``body`` runs while ``condition`` holds.

    The condition is evaluated before each iteration; the loop ends when it
    is false or after ``max_iterations`` iterations, whichever comes first
    (neither is an error). Within the loop, each body node's returned dict
    is merged into a working copy of the state by plain assignment, which
    the next body node and the next condition see; the node's update is
    every key the loop added or rebound, merged like any node's update.
    """

    def __init__(self, name: str, condition: Condition, max_iterations: int,
                 body: list[Node]) -> None:
        self.name = name
        self.condition = condition
        self.max_iterations = max_iterations
        self.body = body
        # A Lua body's empty table may stand for an empty list (the runner's merge
        # decides by the node's language).
        self.language = (Language.LUA if any(node.language == Language.LUA for node in body)
                         else Language.PYTHON)

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> dict:
        working = dict(state)
        for iteration in range(self.max_iterations):
            try:
                holds = self.condition.holds(working, context)
            except _NOT_THE_BODYS_FAILURE:
                raise
            except Exception as exc:
                raise LoopBodyError(
                    f"while_loop {self.name!r}: condition {self.condition.expression!r} failed "
                    f"at iteration {iteration}: {type(exc).__name__}: {exc}") from exc
            if not holds:
                break
            for node in self.body:
                try:
                    update = context.resolve(node.run(working, context))
                except _NOT_THE_BODYS_FAILURE:
                    raise
                except Exception as exc:
                    raise LoopBodyError(
                        f"while_loop {self.name!r}: body node {node.name!r} failed at "
                        f"iteration {iteration}: {type(exc).__name__}: {exc}") from exc
                if update is None:
                    continue
                if not isinstance(update, dict):
                    raise LoopBodyError(
                        f"while_loop {self.name!r}: body node {node.name!r} returned a "
                        f"{type(update).__name__}, not a dict of state updates "
                        f"(iteration {iteration})")
                working.update(update)
        return {key: value for key, value in working.items()
                if key not in state or state[key] is not value}

    def failure_site(self, error: BaseException) -> str | None:
        cause = error.__cause__ if isinstance(error, LoopBodyError) else error
        if cause is None:
            return None
        for part in (*self.body, self.condition):
            site = part.failure_site(cause)
            if site is not None:
                return site
        return None


# The line that ends code without ``return`` (see PeerPythonNode); the helper is a global.
_LOCALS_HELPER = "__isobranch_assigned__"
_RETURN_LOCALS = f"\nreturn {_LOCALS_HELPER}(locals())\n"
# The body function's parameters: not names the code assigned.
_PARAMETERS = frozenset({"state", "variables", "parallel_results"})


def _assigned(names: dict[str, Any]) -> dict[str, Any]:
    """The names code without ``return`` assigned, as the format's update: not ``_x``,
    not the body's parameters, not modules, functions or classes (no state value)."""
    return {name: value for name, value in names.items()
            if not name.startswith("_") and name not in _PARAMETERS
            and not isinstance(value, (types.ModuleType, types.FunctionType, type))}


class PeerPythonNode(PythonNode):
    """Python code of the_edge_agent's format.

    ``json`` is a global, as that format gives it, and so is the module
    ``datetime`` when the code names it. Code in which the word ``return``
    does not appear updates the state with the names it assigned (except
    ``_x``, modules, functions and classes), as that format runs it.
    """

    def __init__(self, name: str, source: str, **options: Any) -> None:
        if "return" not in source:
            # Appended after the code, its lines keep their numbers in messages.
            source = source.rstrip("\n") + _RETURN_LOCALS
        super().__init__(name, source, **options)

    def globals(self) -> dict[str, Any]:
        names = super().globals()
        names["json"] = json
        names[_LOCALS_HELPER] = _assigned
        if "datetime" in self.source:
            names["datetime"] = datetime
        return names


class ResultUnderKey(Node):
    """A node whose ``output: key`` stores what its code returned under ``key``.

    The returned value, whatever it is (a dict too), becomes ``{key: value}``;
    ``None`` (no ``return``) stores ``None``.
    """

    def __init__(self, inner: Node, key: str) -> None:
        self.name = inner.name
        self.inner = inner
        self.key = key
        self.language = inner.language

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> dict:
        return {self.key: context.resolve(self.inner.run(state, context, parallel_results))}

    def failure_site(self, error: BaseException) -> str | None:
        return self.inner.failure_site(error)
