"""Deep copies of branch state, and the path of whatever cannot be copied."""

from __future__ import annotations

import copy
import pickle
from typing import Any

from .errors import StateCopyError


class StateSnapshot:
    """The state after a fan-out node, from which each branch takes its own copy.

    The state is pickled once and unpickled per branch: several times faster
    than ``copy.deepcopy`` for JSON-like data. State that pickle refuses but
    ``deepcopy`` accepts (a lambda, say) still works on in-process backends;
    ``picklable`` tells backends that must cross a process boundary.
    """

    __slots__ = ("_frozen", "_original", "picklable")

    def __init__(self, state: dict) -> None:
        self._original: dict | None = None
        try:
            self._frozen: bytes | None = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
            self.picklable = True
        except Exception as pickle_exc:
            self._frozen = None
            self.picklable = False
            try:
                copy.deepcopy(state)
            except Exception as exc:
                path, reason = find_unpicklable(state, "state")
                raise StateCopyError(path, reason or f"cannot be copied ({exc})") from pickle_exc
            self._original = state

    def copy(self) -> dict:
        """Return a new deep copy of the snapshotted state."""
        if self._frozen is not None:
            return pickle.loads(self._frozen)
        return copy.deepcopy(self._original)


# Values that cannot change: a copy may share them.
_IMMUTABLE_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


class ScalarSnapshot:
    """A snapshot of a small dict whose values are immutable scalars (a map item and its
    index, say): a copy is a new dict sharing those values, with no pickling."""

    __slots__ = ("_values",)
    picklable = True

    def __init__(self, values: dict) -> None:
        self._values = dict(values)

    def copy(self) -> dict:
        """Return a new dict of the snapshotted values."""
        return dict(self._values)


def private_copy(values: dict) -> dict:
    """A deep copy of ``values``, as cheap as they allow: a new dict when every value is an
    immutable scalar, a pickle round trip otherwise (``StateCopyError`` if it cannot be)."""
    for value in values.values():
        if type(value) not in _IMMUTABLE_SCALARS:
            return StateSnapshot(values).copy()
    return dict(values)


def snapshot_of(values: dict) -> StateSnapshot | ScalarSnapshot:
    """The cheapest snapshot that copies ``values`` faithfully."""
    if all(type(value) in _IMMUTABLE_SCALARS for value in values.values()):
        return ScalarSnapshot(values)
    return StateSnapshot(values)


def find_unpicklable(value: Any, path: str, _seen: set[int] | None = None) -> tuple[str, str]:
    """Return ``(path, reason)`` of the innermost value that fails to pickle."""
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return path, ""
    seen.add(id(value))
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        children = [(f"{path}[{key!r}]", item) for key, item in value.items()]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    elif isinstance(value, (set, frozenset)):
        children = [(f"{path}{{{item!r}}}", item) for item in value]
    for child_path, child in children:
        try:
            pickle.dumps(child, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return find_unpicklable(child, child_path, seen)
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return path, f"cannot copy a {type(value).__name__} ({exc})"
    return path, ""
