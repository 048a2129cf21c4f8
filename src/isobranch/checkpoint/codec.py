"""States as tagged JSON text (a stand-in with the codec's public API).

JSON has no tuples, bytes, sets, non-string keys or nan/inf; each is
written as a one-key object ``{"$tag": ...}`` so it comes back equal.
Decoding builds only plain data: a tampered database cannot run code.
``allow_pickle=True`` stores any other value as a pickle (and reads them).
"""

from __future__ import annotations

import base64
import json
import math
import pickle
from typing import Any


class StateEncodeError(ValueError):
    """A value cannot be stored; ``path`` names where it is (``state['a'][0]``)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class StateDecodeError(ValueError):
    """Stored text is not a state this codec wrote (damaged, tampered or pickled)."""


_TAG = "$"


def encode_value(value: Any, *, allow_pickle: bool = False, path: str = "state") -> str:
    """``value`` as tagged JSON text; ``StateEncodeError`` names the first value that cannot be."""
    return json.dumps(_encode(value, allow_pickle, path, 0), allow_nan=False,
                      separators=(",", ":"))


def decode_value(text: str, *, allow_pickle: bool = False) -> Any:
    """The value ``encode_value`` wrote as ``text``."""
    try:
        raw = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StateDecodeError(f"not a stored state: {exc}") from exc
    return _decode(raw, allow_pickle)


def _encode(value: Any, allow_pickle: bool, path: str, depth: int) -> Any:
    if depth > 500:
        raise StateEncodeError(f"{path}: nested too deeply to store", path)
    if value is None or isinstance(value, (bool, str)) or type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {_TAG + "float": repr(value)}
    if type(value) is list:
        return [_encode(v, allow_pickle, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if type(value) is tuple:
        return {_TAG + "tuple": [_encode(v, allow_pickle, f"{path}[{i}]", depth + 1)
                                 for i, v in enumerate(value)]}
    if type(value) is dict:
        if all(type(k) is str and not k.startswith(_TAG) for k in value):
            return {k: _encode(v, allow_pickle, f"{path}[{k!r}]", depth + 1)
                    for k, v in value.items()}
        return {_TAG + "dict": [[_encode(k, allow_pickle, f"{path} key {k!r}", depth + 1),
                                 _encode(v, allow_pickle, f"{path}[{k!r}]", depth + 1)]
                                for k, v in value.items()]}
    if type(value) in (set, frozenset):
        tag = "set" if type(value) is set else "frozenset"
        return {_TAG + tag: [_encode(v, allow_pickle, f"{path}{{...}}", depth + 1)
                             for v in value]}
    if type(value) is bytes:
        return {_TAG + "bytes": base64.b64encode(value).decode("ascii")}
    if allow_pickle:
        try:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise StateEncodeError(f"{path}: {type(value).__name__} cannot be pickled: {exc}",
                                   path) from exc
        return {_TAG + "pickle": base64.b64encode(data).decode("ascii")}
    raise StateEncodeError(f"{path}: a {type(value).__name__} cannot be stored as JSON "
                           f"(a checkpointer made with pickle=True stores it as a pickle)", path)


def _decode(raw: Any, allow_pickle: bool) -> Any:
    if isinstance(raw, list):
        return [_decode(v, allow_pickle) for v in raw]
    if not isinstance(raw, dict):
        return raw
    if len(raw) == 1:
        (key, body), = raw.items()
        if key.startswith(_TAG):
            return _decode_tagged(key[1:], body, allow_pickle)
    return {k: _decode(v, allow_pickle) for k, v in raw.items()}


def _decode_tagged(tag: str, body: Any, allow_pickle: bool) -> Any:
    try:
        if tag == "float":
            return float(body) if body in ("nan", "inf", "-inf") else _bad(tag)
        if tag == "tuple":
            return tuple(_decode(v, allow_pickle) for v in body)
        if tag == "dict":
            return {_decode(k, allow_pickle): _decode(v, allow_pickle) for k, v in body}
        if tag == "set":
            return {_decode(v, allow_pickle) for v in body}
        if tag == "frozenset":
            return frozenset(_decode(v, allow_pickle) for v in body)
        if tag == "bytes":
            return base64.b64decode(body, validate=True)
        if tag == "pickle":
            if not allow_pickle:
                raise StateDecodeError("the stored state holds a pickle, which this "
                                       "checkpointer does not load (pickle=False)")
            return pickle.loads(base64.b64decode(body, validate=True))
    except StateDecodeError:
        raise
    except Exception as exc:
        raise StateDecodeError(f"damaged {tag!r} value: {exc}") from exc
    return _bad(tag)


def _bad(tag: str) -> Any:
    raise StateDecodeError(f"unknown tag {tag!r} in a stored state")
