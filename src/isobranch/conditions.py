"""Edge conditions and state expressions: Python, Lua, or a callable.

An expression yields a value of the state (a map edge's ``over``); a
condition is an expression whose truth decides whether an edge is taken.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .code_location import CodeLocation
from .errors import ConfigTypeError

if TYPE_CHECKING:
    from .context import ExecutionContext


# What a dict has and a read-only view refuses, rather than reading them as missing keys.
_DICT_MUTATORS = frozenset({"update", "pop", "popitem", "setdefault", "clear"})


class AttributeView(Mapping):
    """A read-only view of a state dict (or ``variables``) whose keys read as attributes too.

    Expressions written for the_edge_agent's YAML say ``state.score`` where
    isobranch's say ``state['score']``; both work on this view. A key wins
    over a mapping method of the same name (``state.items`` is the key
    ``items`` when the state has one, as in that format), a missing key read
    as an attribute is None (as there), and a nested dict read as an
    attribute is a view too. Item access returns the stored value itself.
    The view cannot change the state: it has no setters.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_"):
            return object.__getattribute__(self, name)
        data = object.__getattribute__(self, "_data")
        if name in data:
            value = data[name]
            return AttributeView(value) if isinstance(value, dict) else value
        if name in _DICT_MUTATORS:
            raise TypeError(f"the state is read-only in an expression (cannot call {name}())")
        try:
            return object.__getattribute__(self, name)  # get, keys, items, values, copy
        except AttributeError:
            return None

    def copy(self) -> dict:
        """A shallow copy as a plain dict."""
        return dict(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"the state is read-only in an expression (cannot set {name!r})")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


class Expression:
    """A value computed from the state (and ``variables``)."""

    expression: str = ""

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        """The expression's value for ``state``."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the expression is shown in messages and drawings."""
        return self.expression

    def failure_site(self, error: BaseException) -> str | None:
        """What a message about ``error`` adds: where in its file the expression raised it.

        ``at agent.yaml:25``; None when unknown.
        """
        return None


class Condition(Expression):
    """Decides whether a conditional edge is taken."""

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        """True if the edge should be followed for ``state``."""
        raise NotImplementedError


class PythonCondition(Condition):
    """A Python expression over ``state`` and ``variables``; its truth value decides.

    With a ``location`` (the expression was read from a file), tracebacks
    name that file and its line numbers.
    """

    def __init__(self, expression: str, *, origin: str = "<when>",
                 location: CodeLocation | None = None) -> None:
        self.expression = expression
        self.origin = origin
        self.location = location
        text = expression.strip()
        if location is None:
            self._code = compile(text, origin, "eval")
            return
        # The stripped text starts below the blank lines in front of it.
        blank = expression[:len(expression) - len(expression.lstrip())].count("\n")
        self._site = replace(location, line=location.line + blank)
        tree = ast.parse(text, location.file, "eval")
        ast.increment_lineno(tree, self._site.line - 1)
        self._site.remember(text)
        self._code = compile(tree, location.file, "eval")

    def __getstate__(self) -> dict:
        return {"expression": self.expression, "origin": self.origin, "location": self.location}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["expression"], origin=data["origin"], location=data.get("location"))

    def failure_site(self, error: BaseException) -> str | None:
        if self.location is None:
            return None
        return self._site.python_site(error, self.expression.strip())

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        # The view lets ``state.key`` read a key, as the_edge_agent's expressions do.
        scope = {"state": AttributeView(state),
                 "variables": AttributeView(context.graph.variables)}
        return context.resolve(eval(self._code, {"__builtins__": builtins}, scope))

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        return bool(self.evaluate(state, context))

    def describe(self) -> str:
        return f"python: {self.expression}"


class LuaCondition(Condition):
    """A Lua expression (``return`` optional); ``false`` and ``nil`` mean not taken.

    With a ``location`` (the expression was read from a file), Lua's
    messages name that file and its line numbers.
    """

    def __init__(self, expression: str, *, origin: str = "when",
                 location: CodeLocation | None = None) -> None:
        self.expression = expression
        self.origin = origin
        self.location = location
        # What the VM runs, under which chunk name.
        self._code, self._chunk_name = (
            (location.lua_code(expression), location.lua_chunk_name) if location
            else (expression, origin))

    def __getstate__(self) -> dict:
        return {"expression": self.expression, "origin": self.origin, "location": self.location}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["expression"], origin=data["origin"], location=data.get("location"))

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        return context.run_lua("evaluate", self._code, state, chunk_name=self._chunk_name)

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        value = context.run_lua("eval_condition", self._code, state, chunk_name=self._chunk_name)
        return value not in (None, "false")

    def failure_site(self, error: BaseException) -> str | None:
        return self.location.lua_site(error, self.expression) if self.location else None

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
