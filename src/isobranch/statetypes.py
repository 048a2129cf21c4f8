"""Declared types of state keys: built from Python annotations or YAML type names, checked cheaply.

A check looks at a value's class only (the origin of a generic:
``list[int]`` checks ``list``, not its items), so checking every update
costs the same whatever the size of the value. The rules follow JSON
Schema's where Python's differ: ``bool`` is not an ``int``, but an ``int``
is a ``float`` (JSON's "number"). ``None`` is accepted only when declared
(``Optional[str]``, ``str | None``, YAML ``str | none``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import UncheckableType

# YAML type names (Python's and JSON Schema's) -> the class they check.
# ``any`` checks nothing; ``none`` / ``null`` is the None value.
TYPE_NAMES: dict[str, type | None] = {
    "str": str, "string": str, "int": int, "integer": int, "float": float, "number": float,
    "bool": bool, "boolean": bool, "list": list, "array": list, "dict": dict, "object": dict,
    "none": type(None), "null": type(None), "any": None,
}
# What a builtin class also accepts (the numeric tower, as JSON's "number").
_WIDER = {float: (int,), complex: (int, float)}
# Classes whose empty value a callable reducer starts from when the key is missing.
EMPTY_STARTS = (list, dict, set, frozenset, tuple, str, int, float, complex)
_TYPED_DICT_WRAPPERS = frozenset(w for w in (typing.Required, typing.NotRequired,
                                              getattr(typing, "ReadOnly", None)) if w is not None)


@dataclass(frozen=True)
class TypeCheck:
    """The classes (and literal values) a state key accepts; ``label`` names them in messages."""

    classes: tuple[type, ...]
    label: str
    literals: tuple[Any, ...] = ()

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of the declared type (class only, not the items of a container)."""
        cls = type(value)
        if cls in self.classes:
            return True
        if self.literals and any(type(value) is type(literal) and value == literal
                                 for literal in self.literals):
            return True
        if cls is bool:  # True is an int to Python, not to a schema
            return False
        return any(isinstance(value, declared) or cls in _WIDER.get(declared, ())
                   for declared in self.classes)

    def may_hold(self, cls: type) -> bool:
        """Whether some value of class ``cls`` passes (for load-time checks of reducers)."""
        return any(issubclass(cls, declared) for declared in self.classes)

    @property
    def empty_factory(self) -> type | None:
        """The builtin class that makes this type's empty value (``list``), if there is one."""
        if len(self.classes) == 1 and self.classes[0] in EMPTY_STARTS and not self.literals:
            return self.classes[0]
        return None


def describe(value: Any, limit: int = 60) -> str:
    """``int 3``, ``str 'abc'``: a value's class and a short repr for a message."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def from_name(name: Any) -> TypeCheck | None:
    """A check for a YAML type name such as ``int``, ``list`` or ``str | none``.

    Returns None for ``any``; raises ``KeyError`` with the unknown part.
    """
    if not isinstance(name, str) or not name.strip():
        raise KeyError(name)
    classes: list[type] = []
    labels: list[str] = []
    for part in (p.strip().lower() for p in name.split("|")):
        if part not in TYPE_NAMES:
            raise KeyError(part)
        cls = TYPE_NAMES[part]
        if cls is None:
            return None
        if cls not in classes:
            classes.append(cls)
            labels.append(part)
    return TypeCheck(tuple(classes), " | ".join(labels))


def split_annotated(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """``Annotated[T, a, b]`` -> ``(T, (a, b))``; anything else -> ``(annotation, ())``.

    ``Required``/``NotRequired``/``ReadOnly`` around or inside it are removed.
    """
    annotation = _unwrap_typed_dict(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        inner = _unwrap_typed_dict(annotation.__origin__)
        return inner, tuple(annotation.__metadata__)
    return annotation, ()


def _unwrap_typed_dict(annotation: Any) -> Any:
    while typing.get_origin(annotation) in _TYPED_DICT_WRAPPERS:
        annotation = typing.get_args(annotation)[0]
    return annotation


def from_annotation(annotation: Any) -> TypeCheck | None:
    """A check for a Python annotation (no ``Annotated``); None when it checks nothing (``Any``).

    Raises ``UncheckableType`` for what ``isinstance`` cannot check.
    """
    classes: list[type] = []
    literals: list[Any] = []
    for member in _members(annotation):
        if member is Any or member is object:
            return None
        if isinstance(member, _Literal):
            literals.append(member.value)
        elif member not in classes:
            classes.append(member)
    label = " | ".join([_label(c) for c in classes] + [repr(v) for v in literals])
    return TypeCheck(tuple(classes), label, tuple(literals))


@dataclass(frozen=True)
class _Literal:
    value: Any


def _members(annotation: Any) -> list[Any]:
    """The classes (and literal values) a union or a single annotation stands for."""
    annotation, metadata = split_annotated(annotation)
    if metadata:  # the outermost Annotated was taken apart already: this one is nested
        raise UncheckableType(f"Annotated[..., {', '.join(map(repr, metadata))}] inside another "
                              f"type is not read; put it outermost: Annotated[Optional[T], reducer]")
    if annotation is None or annotation is type(None):
        return [type(None)]
    if annotation is Any or annotation is object:
        return [Any]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    if origin is typing.Literal:
        return [_Literal(v) for v in typing.get_args(annotation)]
    if origin is not None:  # list[int], dict[str, int], Sequence[str]: the origin class only
        annotation = origin
    supertype = getattr(annotation, "__supertype__", None)
    if supertype is not None:  # NewType
        return _members(supertype)
    if typing.is_typeddict(annotation):
        return [dict]
    if not isinstance(annotation, type):
        raise UncheckableType(f"{annotation!r} is not a class isinstance can check")
    try:
        isinstance(None, annotation)
    except TypeError as exc:  # a Protocol that is not runtime_checkable, say
        raise UncheckableType(f"{_label(annotation)} cannot be checked with isinstance ({exc})"
                              ) from None
    return [annotation]


def _label(cls: type) -> str:
    if cls is type(None):
        return "None"
    module = getattr(cls, "__module__", "builtins")
    name = getattr(cls, "__qualname__", repr(cls))
    return name if module in ("builtins", "collections.abc", "typing") else f"{module}.{name}"
