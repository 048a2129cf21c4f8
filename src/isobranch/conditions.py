"""Edge conditions and state expressions: Python, Lua, or a callable.

An expression yields a value of the state (a map edge's ``over``); a
condition is an expression whose truth decides whether an edge is taken.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ConfigTypeError

if TYPE_CHECKING:
    from .context import ExecutionContext


class Expression:
    """A value computed from the state (and ``variables``)."""

    expression: str = ""

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        """The expression's value for ``state``."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the expression is shown in messages and drawings."""
        return self.expression


class Condition(Expression):
    """Decides whether a conditional edge is taken."""

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        """True if the edge should be followed for ``state``."""
        raise NotImplementedError


class PythonCondition(Condition):
    """A Python expression over ``state`` and ``variables``; its truth value decides."""

    def __init__(self, expression: str, *, origin: str = "<when>") -> None:
        self.expression = expression
        self.origin = origin
        self._code = compile(expression.strip(), origin, "eval")

    def __getstate__(self) -> dict:
        return {"expression": self.expression, "origin": self.origin}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["expression"], origin=data["origin"])

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        scope = {"state": state, "variables": context.graph.variables}
        return context.resolve(eval(self._code, {"__builtins__": builtins}, scope))

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        return bool(self.evaluate(state, context))

    def describe(self) -> str:
        return f"python: {self.expression}"


class LuaCondition(Condition):
    """A Lua expression (``return`` optional); ``false`` and ``nil`` mean not taken."""

    def __init__(self, expression: str, *, origin: str = "when") -> None:
        self.expression = expression
        self.origin = origin

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        return context.run_lua("evaluate", self.expression, state, chunk_name=self.origin)

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        value = context.run_lua("eval_condition", self.expression, state, chunk_name=self.origin)
        return value not in (None, "false")

    def describe(self) -> str:
        return f"lua: {self.expression}"


class CallableCondition(Condition):
    """A Python callable of ``state``; its truth value decides."""

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        self.fn = fn
        self.expression = getattr(fn, "__name__", "callable")

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        return context.resolve(self.fn(state))

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        return bool(self.evaluate(state, context))


def as_condition(when: Condition | Callable[[dict], Any] | str) -> Condition:
    """Accept a Condition, a callable of state, or a Python expression string."""
    if isinstance(when, Condition):
        return when
    if isinstance(when, str):
        return PythonCondition(when)
    if callable(when):
        return CallableCondition(when)
    raise ConfigTypeError(f"a condition must be a callable or an expression, got {type(when).__name__}")
