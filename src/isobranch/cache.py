"""``CachePolicy``: which nodes the node cache serves, for how long, on which input.

A node with a policy (``add_node(..., cache=CachePolicy())`` or YAML
``cache:``) is looked up in the graph's cache (``compile(cache=SqliteCache(
path))``, cache_store.py) before it runs; the lookup itself is node_memo.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# A duration as YAML writes it: a number and one unit.
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from a positive number or a duration string (``30s``, ``5m``, ``1h``, ``2d``).

    Raises ``ValueError`` saying what is accepted.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected seconds or a duration such as '30s', '5m', '1h', '2d', "
                         f"got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be more than 0 seconds, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How the node cache serves one node.

    ``ttl``: how long an entry serves (seconds, or a duration string such
    as ``"1h"``); None: until the cache file is deleted. ``keys``: the
    state keys the node reads; the entry is keyed by only those (None: by
    the whole state). A bad value raises ``ValueError``.
    """

    ttl: float | None = None
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.ttl is not None:
            object.__setattr__(self, "ttl", parse_duration(self.ttl))
        if self.keys is not None:
            keys = (self.keys,) if isinstance(self.keys, str) else self.keys
            if not isinstance(keys, Iterable) or isinstance(keys, Mapping):
                raise ValueError(f"keys must be a list of state keys, got {self.keys!r}")
            keys = tuple(keys)
            if not keys or not all(isinstance(key, str) and key for key in keys):
                raise ValueError(f"keys must be a non-empty list of state keys (strings), "
                                 f"got {self.keys!r}")
            object.__setattr__(self, "keys", keys)


def as_cache_policy(value: Any, where: str) -> CachePolicy | None:
    """A node's ``cache=`` / YAML ``cache:`` value as a policy (None: not cached).

    Accepts a ``CachePolicy``, ``True``/``False``/None, or a mapping with
    ``ttl`` and ``keys``. Raises ``ValueError`` starting with ``where``.
    """
    if value is None or value is False:
        return None
    if value is True:
        return CachePolicy()
    if isinstance(value, CachePolicy):
        return value
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"ttl", "keys"}, key=str)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: 'ttl', 'keys'")
        try:
            ttl = None if value.get("ttl") is None else parse_duration(value["ttl"])
        except ValueError as exc:
            raise ValueError(f"{where}: ttl: {exc}") from None
        try:
            return CachePolicy(ttl=ttl, keys=value.get("keys"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    raise ValueError(f"{where}: expected true, false, a CachePolicy or a mapping with ttl "
                     f"and keys, got {value!r}")
