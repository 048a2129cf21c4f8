"""The keys a workflow may use at each level, and the message for one it may not.

Each level of a YAML workflow (top level, ``settings``, ``settings.lua``,
``settings.parallel``, ``settings.checkpoint``, a node, an edge) has its set of known keys here and
nowhere else. A backend's own options are not listed: the registry reads
them from its factory's signature (``isolation.registry.backend_options``),
so a registered third-party backend is checked the same way, and one whose
factory takes ``**kwargs`` accepts anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import StrEnum
from typing import Any


class EdgeType(StrEnum):
    """The ``type:`` of a YAML edge (``simple`` and ``conditional`` are aliases of normal)."""

    NORMAL = "normal"
    SIMPLE = "simple"
    CONDITIONAL = "conditional"
    PARALLEL = "parallel"
    MAP = "map"


class Language(StrEnum):
    """The languages a node body or a condition may be written in."""

    PYTHON = "python"
    LUA = "lua"


TOP_LEVEL_KEYS: frozenset[str] = frozenset(
    {"name", "description", "variables", "state_schema", "settings", "nodes", "edges",
     "interrupt_before", "interrupt_after"})
SETTINGS_KEYS: frozenset[str] = frozenset({"lua", "parallel", "checkpoint", "cache"})
LUA_SETTINGS_KEYS: frozenset[str] = frozenset({"timeout", "max_memory"})
CHECKPOINT_SETTINGS_KEYS: frozenset[str] = frozenset({"path", "pickle"})
CACHE_SETTINGS_KEYS: frozenset[str] = frozenset({"path"})
# Besides these, settings.parallel takes the chosen backend's own options and
# a mapping per backend name (that backend's options).
PARALLEL_KEYS: frozenset[str] = frozenset({
    "isolation", "strategy", "max_workers", "branch_timeout", "fail_fast", "max_steps",
    "branch_max_memory", "max_concurrency", "retry",
})
NODE_KEYS: frozenset[str] = frozenset(
    {"name", "run", "file", "language", "fan_in", "description", "retry",
     "subgraph", "input", "output", "cache", "replay"})
# Keys only a map fan-out edge takes.
MAP_EDGE_KEYS: frozenset[str] = frozenset({"over", "as", "index_as", "max_concurrency"})
# Keys only fan-out edges (parallel and map) take.
FAN_OUT_EDGE_KEYS: frozenset[str] = frozenset({"retry"})
EDGE_KEYS: frozenset[str] = (frozenset({"from", "to", "type", "fan_in", "when"}) | MAP_EDGE_KEYS
                             | FAN_OUT_EDGE_KEYS)
# Backend options a Lua-only (untrusted) document may set. Anything else, such
# as a Dask scheduler address, decides where this process connects and what it
# unpickles, so only the caller may give it (YAMLEngine(...) keywords).
UNTRUSTED_BACKEND_OPTIONS: frozenset[str] = frozenset(
    {"fresh_worker_per_branch", "start_method", "retries", "connect_timeout", "worker_wait"})


def unknown(prefix: str, key: Any, allowed: Iterable[str], *,
            also_suggest: Iterable[str] = ()) -> str:
    """``"<prefix> (allowed: a, b); did you mean 'a'?"`` for an unknown ``key``.

    The suggestion is the closest allowed name (``difflib``), if any is
    close, or the closest of ``also_suggest``: names that are not allowed
    here but that a misspelt key may have meant (another backend's options).
    """
    names = sorted(allowed)
    text = f"{prefix} (allowed: {', '.join(names) if names else 'none'})"
    match = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6) or \
        difflib.get_close_matches(str(key), sorted(set(also_suggest)), n=1, cutoff=0.6)
    if match:
        text += f"; did you mean {match[0]!r}?"
    return text
