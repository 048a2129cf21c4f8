"""The short texts every regression message is built from: capped reprs, key paths, bounded text."""

from __future__ import annotations

import re
import reprlib
from typing import Any

# How much of a value a one-line repr shows: string and other reprs, items
# of a list, tuple or dict, and levels of nesting.
SHORT_REPR_CHARS = 80
SHORT_REPR_ITEMS = 8
SHORT_REPR_LEVELS = 4

# A key that reads as ``a.b`` in a path; any other key is shown as ``a['k']``.
PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

_REPR = reprlib.Repr()
_REPR.maxstring = SHORT_REPR_CHARS
_REPR.maxother = SHORT_REPR_CHARS
_REPR.maxlist = _REPR.maxtuple = SHORT_REPR_ITEMS
_REPR.maxdict = SHORT_REPR_ITEMS
_REPR.maxlevel = SHORT_REPR_LEVELS


def short(value: Any) -> str:
    """A one-line, length-capped repr for reports."""
    try:
        return _REPR.repr(value)
    except Exception:  # an odd object's __repr__ must not crash the report
        return f"<{type(value).__name__}>"


def join_key(path: str, key: Any) -> str:
    """``path`` extended by ``key``: ``a.b`` for a plain key, ``a['k k']`` or ``a[1]`` otherwise."""
    if isinstance(key, str) and PLAIN_KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def bounded(text: str, limit: int) -> str:
    """``text``, or its start and end around a note of what was left out."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} ... [{len(text) - 2 * keep} characters left out] ... {text[-keep:]}"


def indent_rest(text: str, indent: str) -> str:
    """``text`` with every line after the first indented by ``indent``."""
    return text.replace("\n", "\n" + indent)
