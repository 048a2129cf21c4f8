"""Python <-> Lua values for isobranch's Lua VMs.

Values cross the boundary as bytes, never as Python object proxies: Python
``marshal`` format 4 in both directions. Python writes and reads it in C; the
VM reads and writes it with ``string.unpack``/``string.pack`` (see
``sandbox.lua``). Strings need no escaping, and integers, floats and dict
keys of any scalar type survive exactly. Values marshal does not take as
they are (dict or list subclasses, say) are first rebuilt as plain values;
anything that cannot be converted is named by its path.
"""

from __future__ import annotations

import marshal
import math
from typing import Any

MARSHAL_VERSION = 4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ConversionError(ValueError):
    """A value cannot cross the Python/Lua boundary; ``path`` locates it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_lua_bytes(value: Any, path: str = "state") -> bytes:
    """Encode ``value`` for the VM's decoder."""
    try:
        return marshal.dumps(value, MARSHAL_VERSION)
    except (ValueError, TypeError):
        return marshal.dumps(plain(value, path), MARSHAL_VERSION)


def from_lua_bytes(data: bytes) -> Any:
    """Decode what the VM's encoder wrote."""
    try:
        return marshal.loads(data)
    except (ValueError, EOFError, TypeError) as exc:
        raise ConversionError("result", f"a Lua string is not valid UTF-8 text ({exc})") from None


def plain(value: Any, path: str = "state", _active: set[int] | None = None) -> Any:
    """A copy of ``value`` made of plain dict/list/str/int/float/bool/None.

    Raises ``ConversionError`` naming the path of the first value Lua cannot
    hold: an unsupported type, a cycle, an integer beyond 64 bits, a key that
    cannot be a Lua table key.
    """
    active = _active if _active is not None else set()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ConversionError(path, f"integer {value} does not fit in a Lua integer (64 bits)")
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConversionError(path, f"string is not valid Unicode text ({exc.reason})") from None
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (dict, list, tuple)):
        if id(value) in active:
            raise ConversionError(path, "cycle (a container that contains itself)")
        active.add(id(value))
        try:
            if isinstance(value, dict):
                result = {}
                for key, item in value.items():
                    key_path = f"{path}[{key!r}]"
                    if key is None or not isinstance(key, (str, int, float, bytes)):
                        raise ConversionError(
                            key_path, f"a {type(key).__name__} key cannot be a Lua table key")
                    if isinstance(key, float) and math.isnan(key):
                        raise ConversionError(key_path, "NaN cannot be a Lua table key")
                    result[plain(key, key_path, active)] = plain(item, key_path, active)
                return result
            return [plain(item, f"{path}[{index}]", active) for index, item in enumerate(value)]
        finally:
            active.discard(id(value))
    raise ConversionError(path, f"cannot convert object of type {type(value).__name__} to Lua")
