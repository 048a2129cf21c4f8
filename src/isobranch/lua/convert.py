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

from ..errors import ConversionError

MARSHAL_VERSION = 4
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# How deeply containers may nest to cross the boundary, either way (the VM's
# codec enforces the same number). Deeper data is refused with its path:
# Python's own recursion (and marshal's limit of 2000) would otherwise fail
# with no path, and Lua's stack with no message.
MAX_DEPTH = 200
DEPTH_REASON = f"containers nested deeper than {MAX_DEPTH} levels (the Lua conversion depth limit)"
# A path is shown in full up to this many keys; a longer one keeps its ends.
_PATH_KEYS_SHOWN = 8


def to_lua_bytes(value: Any, path: str = "state") -> bytes:
    """Encode ``value`` for the VM's decoder."""
    try:
        return marshal.dumps(value, MARSHAL_VERSION)
    except (ValueError, TypeError):
        return marshal.dumps(plain(value, path), MARSHAL_VERSION)


def state_key_error(key: str, root: str = "state") -> ConversionError | None:
    """Why the top-level string ``key`` cannot be a Lua key (not UTF-8 text), or None."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        return ConversionError(f"{root}[{key!r}]",
                               f"string is not valid Unicode text ({exc.reason})")
    return None


def item_to_lua_bytes(container: dict, key: Any, root: str = "state") -> bytes:
    """Encode ``container[key]`` alone, for a table filled one key at a time.

    Errors name the path from ``root`` and count depth from it, as if the
    whole container had been encoded.
    """
    value = container[key]
    try:
        return marshal.dumps(value, MARSHAL_VERSION)
    except (ValueError, TypeError):
        return marshal.dumps(plain_item(container, key, root), MARSHAL_VERSION)


def plain_item(container: dict, key: Any, root: str = "state") -> Any:
    """``plain(container[key])`` with the path, depth and cycles counted from ``root``."""
    return _plain(container[key], root, [f"[{key!r}]"], {id(container)})


def from_lua_bytes(data: bytes) -> Any:
    """Decode what the VM's encoder wrote."""
    try:
        return marshal.loads(data)
    except (ValueError, EOFError, TypeError) as exc:
        raise ConversionError("result", f"a Lua string is not valid UTF-8 text ({exc})") from None


def plain(value: Any, path: str = "state") -> Any:
    """A copy of ``value`` made of plain dict/list/str/int/float/bool/None.

    Raises ``ConversionError`` naming the path of the first value Lua cannot
    hold: an unsupported type, a cycle, an integer beyond 64 bits, a key that
    cannot be a Lua table key, containers nested deeper than ``MAX_DEPTH``.
    """
    return _plain(value, path, [], set())


def key_path(root: str, keys: list[str]) -> str:
    """``root`` followed by ``keys`` (each already ``[...]``), the middle left out when long."""
    if len(keys) <= _PATH_KEYS_SHOWN:
        return root + "".join(keys)
    head, tail = _PATH_KEYS_SHOWN // 2, _PATH_KEYS_SHOWN // 2 - 1
    hidden = len(keys) - head - tail
    return f"{root}{''.join(keys[:head])}...({hidden} more)...{''.join(keys[-tail:])}"


def _plain(value: Any, root: str, keys: list[str], active: set[int]) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ConversionError(key_path(root, keys),
                                  f"integer {value} does not fit in a Lua integer (64 bits)")
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConversionError(key_path(root, keys),
                                  f"string is not valid Unicode text ({exc.reason})") from None
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (dict, list, tuple)):
        if id(value) in active:
            raise ConversionError(key_path(root, keys), "cycle (a container that contains itself)")
        if len(keys) >= MAX_DEPTH:
            raise ConversionError(key_path(root, keys), DEPTH_REASON)
        active.add(id(value))
        try:
            if isinstance(value, dict):
                result = {}
                for key, item in value.items():
                    keys.append(f"[{key!r}]")
                    if key is None or not isinstance(key, (str, int, float, bytes)):
                        raise ConversionError(
                            key_path(root, keys),
                            f"a {type(key).__name__} key cannot be a Lua table key")
                    if isinstance(key, float) and math.isnan(key):
                        raise ConversionError(key_path(root, keys), "NaN cannot be a Lua table key")
                    result[_plain(key, root, keys, active)] = _plain(item, root, keys, active)
                    keys.pop()
                return result
            items = []
            for index, item in enumerate(value):
                keys.append(f"[{index}]")
                items.append(_plain(item, root, keys, active))
                keys.pop()
            return items
        finally:
            active.discard(id(value))
    raise ConversionError(key_path(root, keys),
                          f"cannot convert object of type {type(value).__name__} to Lua")
