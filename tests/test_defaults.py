"""The defaults that several entry points apply agree, and are the documented values."""

from __future__ import annotations

from isobranch import LuaRuntime, StateGraph, YAMLEngine
from isobranch.defaults import (
    DEFAULT_FAIL_FAST,
    DEFAULT_ISOLATION,
    DEFAULT_LUA_MAX_MEMORY,
    DEFAULT_LUA_TIMEOUT,
    DEFAULT_MAX_STEPS,
)


def test_the_defaults_keep_their_values() -> None:
    assert (DEFAULT_ISOLATION, DEFAULT_FAIL_FAST, DEFAULT_LUA_TIMEOUT, DEFAULT_LUA_MAX_MEMORY,
            DEFAULT_MAX_STEPS) == ("thread", False, 30.0, 512 * 1024 * 1024, 10_000)


def _limits(graph) -> tuple:
    return (graph.isolation, graph.fail_fast, graph.lua_timeout, graph.lua_max_memory,
            graph.max_steps)


def test_python_graph_yaml_graph_and_lua_runtime_share_the_defaults() -> None:
    expected = (DEFAULT_ISOLATION, DEFAULT_FAIL_FAST, DEFAULT_LUA_TIMEOUT, DEFAULT_LUA_MAX_MEMORY,
                DEFAULT_MAX_STEPS)
    built = StateGraph()
    built.add_node("only", lambda state: {"done": True})
    built.set_entry_point("only")
    with built.compile() as python_graph:
        assert _limits(python_graph) == expected
    with YAMLEngine().load_from_dict({"nodes": [{"name": "only", "run": "return {}"}]}) as yaml_graph:
        assert _limits(yaml_graph) == expected
    runtime = LuaRuntime()
    try:
        assert (runtime.timeout, runtime.max_memory) == (DEFAULT_LUA_TIMEOUT, DEFAULT_LUA_MAX_MEMORY)
    finally:
        runtime.close()
