"""The checkpoint state codec: Python values <-> JSON text, with tags for what JSON lacks.

``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` and ``dict`` with ``str``
keys are written as plain JSON. Every other supported value is a *tagged value*,
a JSON object with exactly two keys, ``{"$ib": TAG, "v": PAYLOAD}``:

========== ==========================================================
tag        payload
========== ==========================================================
tuple      a list of the items
set        a list of the elements (in iteration order)
frozenset  a list of the elements
bytes      the bytes in base64
bytearray  the bytes in base64
dict       a flat list ``[key1, value1, key2, value2, ...]``, in insertion
           order: a dict with a key that is not a ``str``, or with the key
           ``"$ib"`` (so a plain dict can never pass for a tag)
float      ``"nan"``, ``"inf"`` or ``"-inf"``
int        the int in hex, for ints too long to write in decimal (> 600 digits)
pickle     a pickle in base64 (only with ``allow_pickle=True``)
========== ==========================================================

Types are exact: a subclass of a supported type (``OrderedDict``, ``defaultdict``,
an ``IntEnum`` member, a ``str`` subclass) is not written as its base type,
which would lose its type on the way back; like any other type it needs
``allow_pickle=True``, which pickles the value as a whole. Shared references
are not kept: a list that appears twice in a state comes back as two equal lists.

Decoding without ``allow_pickle`` builds nothing but the builtin types above,
so a tampered database cannot run code; a pickle tag is then a
``StateDecodeError``. (A little over 400 lines: the encode walks test the
plain cases inline, for speed, and this docstring is the format's spec.)
"""

from __future__ import annotations

import base64
import json
import math
import pickle
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ..errors import IsobranchError, StateDecodeError, StateEncodeError

TAG_KEY = "$ib"
VALUE_KEY = "v"
MAX_DEPTH = 200
"""Containers nested deeper than this are refused (and so are self-referencing ones)."""

# Python refuses to print or parse decimal ints of more than
# sys.get_int_max_str_digits() digits (never set below 640): longer ones go as hex.
_INT_MAX = 10**600
_INT_MIN = -_INT_MAX
_INF = math.inf
_NEG_INF = -math.inf
_HEX_INT = re.compile(r"-?[0-9a-f]+")
_SUPPORTED = "None, bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset"


class Tag(StrEnum):
    """The tags of tagged values: the ``"$ib"`` member of their JSON object."""

    TUPLE = "tuple"
    SET = "set"
    FROZENSET = "frozenset"
    BYTES = "bytes"
    BYTEARRAY = "bytearray"
    DICT = "dict"
    FLOAT = "float"
    INT = "int"
    PICKLE = "pickle"


_KEY = object()  # in a failure's step: the key of that dict entry failed, not its value


class _Failure(IsobranchError):
    """Raised inside the walk; each container it leaves adds where the value was.

    Private to the walk, which turns it into a ``StateEncodeError``; an
    ``IsobranchError`` all the same, should one ever escape.
    """

    def __init__(self, reason: str, *, too_deep: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_deep = too_deep
        self.steps: list[tuple[Any, Any, Any]] = []  # (container, key or index, item), innermost first

    def add(self, container: Any, where: Any, item: Any) -> None:
        self.steps.append((container, where, item))


def encode_value(value: Any, *, allow_pickle: bool = False, path: str = "state") -> str:
    """Return ``value`` as JSON text that :func:`decode_value` turns back into an equal
    value of the same types, at every level.

    A value of an unsupported type raises :class:`StateEncodeError` naming its path
    (``path`` names ``value`` itself) unless ``allow_pickle`` is true, in which case
    it is pickled. Nesting deeper than ``MAX_DEPTH`` containers, or a structure that
    contains itself, is a ``StateEncodeError`` too.
    """
    try:
        return _json_text(_encode(value, 0, allow_pickle))
    except _Failure as failure:
        raise _error(failure, path) from None
    except RecursionError:
        raise StateEncodeError(path, "nested too deeply to encode from this call depth") from None


def decode_value(text: str, *, allow_pickle: bool = False) -> Any:
    """Return the value :func:`encode_value` encoded as ``text``.

    Raises :class:`StateDecodeError` for text it did not write. Without
    ``allow_pickle`` nothing is unpickled, and no constructor beyond the builtin
    containers and scalars runs.
    """
    if isinstance(text, bytes | bytearray):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateDecodeError(f"stored text is not UTF-8: {exc}") from None
    elif not isinstance(text, str):
        raise StateDecodeError(f"expected stored JSON text, got {type(text).__name__}")
    try:
        return (_PICKLE_DECODER if allow_pickle else _SAFE_DECODER).decode(text)
    except StateDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise StateDecodeError(f"not the JSON text of a stored value: {exc}") from None


# --- encoding -------------------------------------------------------------------------
# The walk returns every container that needs no tag unchanged (no copy), and copies
# a list or dict only once one of its items changed. The scalar checks are inlined in
# the container loops because a function call per scalar would double the cost.

def _encode(value: Any, depth: int, pickling: bool) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if _INT_MIN < value < _INT_MAX else _big_int(value)
    if kind is float:
        return value if _NEG_INF < value < _INF else _special_float(value)
    if kind is dict:
        return _encode_dict(value, depth + 1, pickling)
    if kind is list:
        return _encode_items(value, depth + 1, pickling)
    return _encode_other(value, kind, depth + 1, pickling)


def _encode_items(items: Any, depth: int, pickling: bool) -> Any:
    """The items of a list, tuple or set, encoded: ``items`` itself if none changed,
    else a new list."""
    if depth > MAX_DEPTH:
        raise _Failure(f"nested deeper than {MAX_DEPTH} levels", too_deep=True)
    out = None
    index, item = 0, None
    try:
        for index, item in enumerate(items):
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if (kind is int and _INT_MIN < item < _INT_MAX) or (
                    kind is float and _NEG_INF < item < _INF):
                continue
            new = _encode_item(item, kind, depth + 1, pickling)
            if new is not item:
                if out is None:
                    out = list(items)
                out[index] = new
    except _Failure as failure:
        failure.add(items, index, item)
        raise
    return items if out is None else out


def _encode_item(item: Any, kind: type, depth: int, pickling: bool) -> Any:
    """A container's item that is not plain JSON as it stands, encoded (the walks above
    test the plain cases inline: they are most items, and a call per item costs)."""
    if kind is int:
        return _big_int(item)
    if kind is float:
        return _special_float(item)
    if kind is dict:
        return _encode_dict(item, depth, pickling)
    if kind is list:
        return _encode_items(item, depth, pickling)
    return _encode_other(item, kind, depth, pickling)


def _encode_dict(mapping: dict, depth: int, pickling: bool) -> Any:
    if depth > MAX_DEPTH:
        raise _Failure(f"nested deeper than {MAX_DEPTH} levels", too_deep=True)
    out = None
    key = item = None
    try:
        for key, item in mapping.items():
            if type(key) is not str or key == TAG_KEY:
                break
            kind = type(item)
            if kind is str or kind is bool or item is None:
                continue
            if (kind is int and _INT_MIN < item < _INT_MAX) or (
                    kind is float and _NEG_INF < item < _INF):
                continue
            new = _encode_item(item, kind, depth + 1, pickling)
            if new is not item:
                if out is None:
                    out = mapping.copy()
                out[key] = new
        else:
            return mapping if out is None else out
    except _Failure as failure:
        failure.add(mapping, key, item)
        raise
    return _encode_pairs(mapping, depth, pickling)


def _encode_pairs(mapping: dict, depth: int, pickling: bool) -> dict:
    """A dict that plain JSON cannot hold, as a flat list of keys and values."""
    flat = []
    key = item = None
    failing = _KEY
    try:
        for key, item in mapping.items():
            failing = _KEY
            flat.append(_encode(key, depth, pickling))
            failing = item
            flat.append(_encode(item, depth, pickling))
    except _Failure as failure:
        failure.add(mapping, key, failing)
        raise
    return {TAG_KEY: Tag.DICT, VALUE_KEY: flat}


def _encode_other(value: Any, kind: type, depth: int, pickling: bool) -> dict:
    if kind is tuple:
        return {TAG_KEY: Tag.TUPLE, VALUE_KEY: _encode_items(value, depth, pickling)}
    if kind is set or kind is frozenset:
        items = _encode_items(value, depth, pickling)
        return {TAG_KEY: Tag.SET if kind is set else Tag.FROZENSET,
                VALUE_KEY: items if type(items) is list else list(items)}
    if kind is bytes or kind is bytearray:
        return {TAG_KEY: Tag.BYTES if kind is bytes else Tag.BYTEARRAY,
                VALUE_KEY: base64.b64encode(value).decode("ascii")}
    if pickling:
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise _Failure(f"{_type_name(kind)} cannot be pickled: {exc}") from None
        return {TAG_KEY: Tag.PICKLE, VALUE_KEY: base64.b64encode(data).decode("ascii")}
    subclass = next((base for base in (dict, list, tuple, set, frozenset, str, bytes, int, float)
                     if isinstance(value, base)), None)
    why = (f" (a subclass of {subclass.__name__} is not stored as a plain {subclass.__name__}, "
           "which would lose its type)" if subclass is not None else "")
    raise _Failure(f"{_type_name(kind)} is not a type checkpoints store as JSON{why}; "
                   f"supported: {_SUPPORTED}. Convert it, or make the checkpointer with "
                   "pickle=True to store it with pickle")


def _big_int(value: int) -> dict:
    return {TAG_KEY: Tag.INT, VALUE_KEY: format(value, "x")}


def _special_float(value: float) -> dict:
    name = "nan" if value != value else ("inf" if value > 0 else "-inf")
    return {TAG_KEY: Tag.FLOAT, VALUE_KEY: name}


def _error(failure: _Failure, base: str) -> StateEncodeError:
    """The public error for a failure of the walk: its path, and for a structure that
    contains itself, where it refers back to."""
    path = base
    reason = failure.reason
    if failure.steps and failure.steps[0][2] is _KEY:
        reason = f"a dict key: {reason}"
    seen: dict[int, str] = {}
    for container, where, item in reversed(failure.steps):
        seen[id(container)] = path
        kind = type(container)
        path += f"{{{_short(item)}}}" if kind is set or kind is frozenset else f"[{_short(where)}]"
        if failure.too_deep and id(item) in seen:
            return StateEncodeError(path, f"a self-referencing structure: this is {seen[id(item)]} "
                                          "again, which cannot be stored")
    return StateEncodeError(path, reason)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# allow_nan=False: every non-finite float was tagged, so one reaching here is a bug to see.
_ENCODER = json.JSONEncoder(allow_nan=False, check_circular=False, separators=(",", ":"))


def _make_json_text() -> Callable[[Any], str]:
    """``_ENCODER.encode``, the same text, without making a C encoder for every value.

    ``JSONEncoder.encode`` builds a fresh C encoder per call, which costs a
    checkpoint more than encoding a small branch result does; this one is
    built once from ``_ENCODER``'s own settings (no circular-reference
    markers, as ``check_circular=False`` has none). Without the C
    accelerator it is ``_ENCODER.encode`` itself.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    encoder = _ENCODER
    strings = (json.encoder.encode_basestring_ascii if encoder.ensure_ascii
               else json.encoder.encode_basestring)
    chunks = make(None, encoder.default, strings, encoder.indent,
                  encoder.key_separator, encoder.item_separator, encoder.sort_keys,
                  encoder.skipkeys, encoder.allow_nan)
    join = "".join
    return lambda value: join(chunks(value, 0))


_json_text = _make_json_text()


# --- decoding -------------------------------------------------------------------------
# json calls the object hook innermost object first, so a tag's payload is already
# decoded when its tag is. Every payload's shape is checked before it is used.

def _tagged(obj: dict, allow_pickle: bool) -> Any:
    if len(obj) != 2 or VALUE_KEY not in obj:
        raise StateDecodeError(f"malformed tagged value {_short(obj)}: a tagged value is "
                               f'{{"{TAG_KEY}": tag, "{VALUE_KEY}": payload}} and nothing else')
    tag = obj[TAG_KEY]
    decode = _DECODERS.get(tag) if type(tag) is str else None
    if decode is None:
        raise StateDecodeError(f"unknown tag {_short(tag)} (known: {', '.join(Tag)})")
    if decode is _unpickle and not allow_pickle:
        raise StateDecodeError(
            "the stored state holds a pickled value and pickle is off: it was written by a "
            "checkpointer made with pickle=True (or tampered with); only such a checkpointer "
            "reads it, and unpickling runs whatever code the data names, so do that only "
            "for a database you trust")
    return decode(obj[VALUE_KEY])


def _object_hook(obj: dict) -> Any:
    return _tagged(obj, False) if TAG_KEY in obj else obj


def _object_hook_pickling(obj: dict) -> Any:
    return _tagged(obj, True) if TAG_KEY in obj else obj


def _reject_constant(name: str) -> Any:
    raise StateDecodeError(f"{name} is not valid here: non-finite floats are stored as tagged values")


def _payload(payload: Any, kind: type, tag: Tag) -> Any:
    if type(payload) is not kind:
        raise StateDecodeError(f"malformed {tag} value: the payload is {_short(payload)}, "
                               f"not a {kind.__name__}")
    return payload


def _hashable(build: Callable[[Any], Any], items: Any, tag: Tag) -> Any:
    try:
        return build(items)
    except TypeError as exc:
        raise StateDecodeError(f"malformed {tag} value: {exc}") from None


def _decode_bytes(payload: Any, tag: Tag = Tag.BYTES) -> bytes:
    text = _payload(payload, str, tag)
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII str
        raise StateDecodeError(f"malformed {tag} value: not base64 ({exc})") from None


def _decode_dict(payload: Any) -> dict:
    flat = _payload(payload, list, Tag.DICT)
    if len(flat) % 2:
        raise StateDecodeError("malformed dict value: an odd number of keys and values")
    pairs = iter(flat)
    result = _hashable(lambda items: dict(zip(items, items, strict=False)), pairs, Tag.DICT)
    if 2 * len(result) != len(flat):
        raise StateDecodeError("malformed dict value: a key appears twice")
    return result


def _decode_float(payload: Any) -> float:
    value = _NON_FINITE.get(payload) if type(payload) is str else None
    if value is None:
        raise StateDecodeError(f"malformed float value {_short(payload)}: expected 'nan', 'inf' or '-inf'")
    return value


def _decode_int(payload: Any) -> int:
    if type(payload) is not str or not _HEX_INT.fullmatch(payload):
        raise StateDecodeError(f"malformed int value {_short(payload)}: expected hex digits")
    return int(payload, 16)


def _unpickle(payload: Any) -> Any:
    data = _decode_bytes(payload, Tag.PICKLE)
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise StateDecodeError(f"a pickled value cannot be unpickled: {type(exc).__name__}: {exc}") from None


_NON_FINITE = {"nan": math.nan, "inf": _INF, "-inf": _NEG_INF}
_DECODERS: dict[str, Callable[[Any], Any]] = {
    Tag.TUPLE: lambda payload: tuple(_payload(payload, list, Tag.TUPLE)),
    Tag.SET: lambda payload: _hashable(set, _payload(payload, list, Tag.SET), Tag.SET),
    Tag.FROZENSET: lambda payload: _hashable(frozenset, _payload(payload, list, Tag.FROZENSET),
                                             Tag.FROZENSET),
    Tag.BYTES: _decode_bytes,
    Tag.BYTEARRAY: lambda payload: bytearray(_decode_bytes(payload, Tag.BYTEARRAY)),
    Tag.DICT: _decode_dict,
    Tag.FLOAT: _decode_float,
    Tag.INT: _decode_int,
    Tag.PICKLE: _unpickle,
}
# Built once: json.loads with hooks would build a decoder per call. The decoders keep
# no state between calls that matters (the stdlib shares its default one the same way).
_SAFE_DECODER = json.JSONDecoder(object_hook=_object_hook, parse_constant=_reject_constant)
_PICKLE_DECODER = json.JSONDecoder(object_hook=_object_hook_pickling, parse_constant=_reject_constant)
