"""The defaults of settings that more than one module applies, in one place.

A graph built in Python (``StateGraph.compile``), one loaded from YAML
(``YAMLEngine``) and a bare ``LuaRuntime`` must agree on these; each of
them imports its default from here rather than writing the value again.
"""

from __future__ import annotations

#: The backend that runs parallel branches when no ``isolation`` is given.
DEFAULT_ISOLATION = "thread"
#: Whether the first failed branch stops a fan-out's other branches.
DEFAULT_FAIL_FAST = False
#: Seconds one Lua call may run (``settings.lua.timeout``); ``None`` lifts the limit.
DEFAULT_LUA_TIMEOUT = 30.0
#: Bytes one Lua VM may allocate (``settings.lua.max_memory``).
DEFAULT_LUA_MAX_MEMORY = 512 * 1024 * 1024
#: Steps one path of a run may take before it is stopped as a loop (``max_steps``).
DEFAULT_MAX_STEPS = 10_000
