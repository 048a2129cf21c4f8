"""Reducers: how an update to a state key combines with the value it already has.

``reduce(old, new)`` combines one update and never changes ``old`` (earlier
states and stream events may share it). An ``Accumulator`` folds many
updates into one value at a fan-in, where every branch's writes arrive at
once; the built-in list and dict reducers fold into one private copy, so
10,000 branches appending one item each cost O(n), not O(n²).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from .errors import ReducerError


class _Missing:
    """The value of a key the state does not have yet (one object, also after pickling)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class ReducerName(StrEnum):
    """The built-in reducers, by the name a schema gives them."""

    APPEND = "append"
    EXTEND = "extend"   # an alias of append
    MERGE = "merge"
    SUM = "sum"
    MIN = "min"
    MAX = "max"


class Reducer:
    """Combines updates of one key; ``name`` names it in messages."""

    name: str = "reducer"
    # The class of value it always produces (for load-time checks), if any.
    produces: type | None = None

    def reduce(self, old: Any, new: Any) -> Any:
        """``old`` (or ``MISSING``) combined with ``new``, as a new value."""
        raise NotImplementedError

    def accumulator(self, old: Any) -> Accumulator:
        """A fold of many updates starting from ``old`` (or ``MISSING``)."""
        return Accumulator(self, old)


class Accumulator:
    """Folds updates one at a time: ``add(new)`` for each, ``value`` at the end."""

    def __init__(self, reducer: Reducer, start: Any) -> None:
        self._reducer = reducer
        self.value = start

    def add(self, new: Any) -> None:
        """Combine ``new`` into the value."""
        self.value = self._reducer.reduce(self.value, new)


def _list_start(old: Any, name: str) -> list:
    if old is MISSING or old is None:
        return []
    if not isinstance(old, list):
        raise ReducerError(f"reducer {name!r} needs a list, but the key holds a "
                           f"{type(old).__name__}")
    return old


class AppendReducer(Reducer):
    """Lists concatenate (as ``operator.add`` does); any other value is added as one element."""

    produces = list

    def __init__(self, name: str = ReducerName.APPEND.value) -> None:
        self.name = name

    def reduce(self, old: Any, new: Any) -> Any:
        if type(old) is not list:
            old = _list_start(old, self.name)
        return old + new if isinstance(new, list) else [*old, new]

    def accumulator(self, old: Any) -> Accumulator:
        return _ListAccumulator(list(_list_start(old, self.name)))


class _ListAccumulator(Accumulator):
    def __init__(self, start: list) -> None:
        self.value = start  # a private copy: extended in place

    def add(self, new: Any) -> None:
        if isinstance(new, list):
            self.value.extend(new)
        else:
            self.value.append(new)


class MergeReducer(Reducer):
    """Dicts merge, shallowly: the update's keys win."""

    name = ReducerName.MERGE.value
    produces = dict

    def reduce(self, old: Any, new: Any) -> Any:
        return {**_dict_start(old), **_dict_update(new)}

    def accumulator(self, old: Any) -> Accumulator:
        return _DictAccumulator(dict(_dict_start(old)))


class _DictAccumulator(Accumulator):
    def __init__(self, start: dict) -> None:
        self.value = start  # a private copy: updated in place

    def add(self, new: Any) -> None:
        self.value.update(_dict_update(new))


def _dict_start(old: Any) -> Mapping:
    if old is MISSING or old is None:
        return {}
    if not isinstance(old, Mapping):
        raise ReducerError(f"reducer 'merge' needs a dict, but the key holds a "
                           f"{type(old).__name__}")
    return old


def _dict_update(new: Any) -> Mapping:
    if not isinstance(new, Mapping):
        raise ReducerError(f"reducer 'merge' needs a dict update, got a {type(new).__name__}")
    return new


class BinaryReducer(Reducer):
    """``fn(old, new)``; a missing (or None) old value is replaced by the update."""

    def __init__(self, name: str, fn: Callable[[Any, Any], Any]) -> None:
        self.name = name
        self.fn = fn

    def reduce(self, old: Any, new: Any) -> Any:
        if old is MISSING or old is None:
            return new
        return self.fn(old, new)


class CallableReducer(Reducer):
    """Any Python callable ``(old, new) -> value``.

    A missing old value starts from a new ``start_factory()`` (the declared
    type's empty value: ``[]`` for a list, ``0`` for an int, as LangGraph
    does; new each time, as ``fn`` may change it in place) or, without one,
    the first update is stored as it is.
    """

    def __init__(self, fn: Callable[[Any, Any], Any],
                 start_factory: Callable[[], Any] | None = None) -> None:
        self.fn = fn
        self.start_factory = start_factory
        self.name = getattr(fn, "__qualname__", None) or repr(fn)

    def reduce(self, old: Any, new: Any) -> Any:
        if old is MISSING:
            if self.start_factory is None:
                return new
            old = self.start_factory()
        return self.fn(old, new)

    def accumulator(self, old: Any) -> Accumulator:
        if self.fn is operator.add:
            return _AddAccumulator(self, old)
        return Accumulator(self, old)


class _AddAccumulator(Accumulator):
    """``operator.add`` folded: lists are extended in one private copy, the rest added."""

    def __init__(self, reducer: CallableReducer, start: Any) -> None:
        super().__init__(reducer, start)
        self._owned = False

    def add(self, new: Any) -> None:
        if isinstance(self.value, list) and isinstance(new, list):
            if not self._owned:
                self.value, self._owned = list(self.value), True
            self.value.extend(new)
        else:
            self.value = self._reducer.reduce(self.value, new)
            self._owned = False


# Keys are plain strings: they appear in messages and suggestions.
BUILT_IN: dict[str, Callable[[], Reducer]] = {
    ReducerName.APPEND.value: lambda: AppendReducer(ReducerName.APPEND.value),
    ReducerName.EXTEND.value: lambda: AppendReducer(ReducerName.EXTEND.value),
    ReducerName.MERGE.value: MergeReducer,
    ReducerName.SUM.value: lambda: BinaryReducer(ReducerName.SUM.value, operator.add),
    ReducerName.MIN.value: lambda: BinaryReducer(ReducerName.MIN.value, min),
    ReducerName.MAX.value: lambda: BinaryReducer(ReducerName.MAX.value, max),
}


def built_in(name: str) -> Reducer:
    """The built-in reducer ``name``; ``KeyError`` if there is none."""
    return BUILT_IN[name]()
