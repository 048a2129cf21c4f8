"""Edge conditions: a Python expression, a Lua expression, or a callable."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import ExecutionContext


class Condition:
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

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        scope = {"state": state, "variables": context.graph.variables}
        return bool(eval(self._code, {"__builtins__": builtins}, scope))


class LuaCondition(Condition):
    """A Lua expression (``return`` optional); ``false`` and ``nil`` mean not taken."""

    def __init__(self, expression: str, *, origin: str = "when") -> None:
        self.expression = expression
        self.origin = origin

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        value = context.run_lua("eval_condition", self.expression, state, chunk_name=self.origin)
        return value not in (None, "false")


class CallableCondition(Condition):
    """A Python callable of ``state``; its truth value decides."""

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        self.fn = fn

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        return bool(self.fn(state))


def as_condition(when: Condition | Callable[[dict], Any] | str) -> Condition:
    """Accept a Condition, a callable of state, or a Python expression string."""
    if isinstance(when, Condition):
        return when
    if isinstance(when, str):
        return PythonCondition(when)
    if callable(when):
        return CallableCondition(when)
    raise TypeError(f"a condition must be a callable or an expression, got {type(when).__name__}")
