"""A lazily filled `state`: Lua converts a top-level value on first read, yet sees a plain table."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isobranch import LuaMemoryError, LuaRuntime, LuaTimeoutError
from isobranch.errors import LuaConversionError, LuaRuntimeError
from isobranch.lua import runtime as runtime_module


def state_of(**values):
    return {"n": 1, "name": "x", "items": [{"id": i, "tags": ["a"]} for i in range(50)],
            "meta": {"v": 3}, **values}


@pytest.fixture
def fetched():
    """The top-level keys converted for Lua, in order."""
    keys: list = []
    real = runtime_module.item_to_lua_bytes

    def spy(container, key, root="state"):
        keys.append(key)
        return real(container, key, root)

    with mock.patch.object(runtime_module, "item_to_lua_bytes", spy):
        yield keys


def test_reading_one_key_converts_only_that_key(fetched):
    assert LuaRuntime().execute_node_code("return {n = state.n + 1}", state_of()) == {"n": 2}
    assert fetched == ["n"]


def test_a_key_read_twice_is_converted_once(fetched):
    assert LuaRuntime().execute("return state.meta.v + state.meta.v", state_of()) == 6
    assert fetched == ["meta"]


def test_walking_or_returning_the_state_converts_every_key(fetched):
    runtime = LuaRuntime()
    assert runtime.execute("local n = 0 for _ in pairs(state) do n = n + 1 end return n",
                           state_of()) == 4
    assert sorted(fetched) == ["items", "meta", "n", "name"]
    fetched.clear()
    assert runtime.execute_node_code("return state", state_of()) == state_of()
    assert sorted(fetched) == ["items", "meta", "n", "name"]


@pytest.mark.parametrize(("code", "expected"), [
    ("return state.n", 1),
    ("return state.missing", None),
    ("return rawget(state, 'name')", "x"),
    ("return rawget(state, 'missing')", None),
    ("return #state.items", 50),
    ("return #state", 0),
    ("return rawlen(state)", 0),
    ("local n = 0 for _ in ipairs(state) do n = n + 1 end return n", 0),
    ("local k = next(state) return k ~= nil and state[k] ~= nil", True),
    ("local _ = state.n local n = 0 for _ in pairs(state) do n = n + 1 end return n", 4),
    ("local keys = {} for k in next, state do keys[#keys + 1] = k end table.sort(keys) "
     "return table.concat(keys, ',')", "items,meta,n,name"),
    ("local f = pairs({}) local n = 0 for _ in f, state do n = n + 1 end return n", 4),
    ("return rawequal(select(1, pairs(state)), next)", True),
    ("return getmetatable(state)", None),
    ("return tostring(state):sub(1, 7)", "table: "),
    ("return string.format('%s', state):sub(1, 7)", "table: "),
    ("return type(state)", "table"),
    ("local function f(t) return t.name end return f(state)", "x"),
    ("local co = coroutine.wrap(function(t) coroutine.yield(t.meta.v) end) return co(state)", 3),
    ("return load('return name .. n', 'c', 't', state)()", "x1"),
    ("state.n = 5 return state.n", 5),
    ("state.n = nil return state.n", None),
    ("state.n = nil local n = 0 for _ in pairs(state) do n = n + 1 end return n", 3),
    ("rawset(state, 'n', 7) return state.n", 7),
    ("rawset(state, 'items', nil) return rawget(state, 'items')", None),
    ("table.insert(state, 'first') return #state .. state[1]", "1first"),
    ("state[1] = 'a' state[2] = 'b' return table.concat(state, '-')", "a-b"),
    ("setmetatable(state, {__index = function() return 'default' end}) "
     "return state.name .. state.missing .. tostring(getmetatable(state) ~= nil)",
     "xdefaulttrue"),
    ("setmetatable(state, nil) return getmetatable(state) == nil and state.meta.v", 3),
    ("local t = setmetatable({}, {__index = state}) return t.name", "x"),
    ("return select(2, pcall(next, nil))", "bad argument #1 to 'next' (table expected, got nil)"),
    ("return select(2, pcall(rawget))", "bad argument #1 to 'rawget' (table expected, got no value)"),
])
def test_the_lazy_state_behaves_as_a_plain_table(code, expected):
    assert LuaRuntime().execute(code, state_of()) == expected


def test_argument_errors_point_at_the_callers_line():
    with pytest.raises(LuaRuntimeError, match=r"^lua:2: bad argument #1 to 'next'"):
        LuaRuntime().execute("local x = 1\nnext(nil)", state_of())
    with pytest.raises(LuaRuntimeError, match=r"^lua:1: index is nil"):
        LuaRuntime().execute("state[nil] = 1", state_of())


def test_node_results_built_from_parts_of_the_state():
    assert LuaRuntime().execute_node_code(
        "return {first = state.items[1], count = #state.items, v = state.meta}", state_of()) == {
        "first": {"id": 0, "tags": ["a"]}, "count": 50, "v": {"v": 3}}


def test_a_state_kept_past_its_call_keeps_that_calls_values():
    original = state_of()
    runtime = LuaRuntime()
    runtime.execute("kept = state", original)
    original["items"].append("changed in Python")
    original["meta"]["v"] = 99
    assert runtime.execute("return #kept.items", {"other": 1}) == 50
    assert runtime.execute("return kept.meta.v", {}) == 3
    assert runtime.execute("return state", {"n": 2}) == {"n": 2}


def test_a_state_kept_in_a_closure_or_coroutine_keeps_its_values():
    runtime = LuaRuntime()
    runtime.execute("get = function() return state end "
                    "co = coroutine.wrap(function(t) coroutine.yield() return t.name end) "
                    "co(state) f = get", state_of())
    assert runtime.execute("return co()", {"name": "other"}) == "x"


def test_an_unread_unconvertible_value_is_never_converted():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {n = state.n}", state_of(bad={1, 2})) == {"n": 1}


@pytest.mark.parametrize("code", [
    "return state.bad",
    "local ok = pcall(function() return state.bad end) return ok",
    "for i = 1, 3 do pcall(rawget, state, 'bad') end return 1",
    "kept = state return 1",  # kept past the call: converted then
])
def test_a_read_unconvertible_value_fails_the_call_whatever_lua_catches(code):
    runtime = LuaRuntime()
    with pytest.raises(LuaConversionError, match=r"^state\['bad'\]\[1\]: cannot convert object"):
        runtime.execute(code, state_of(bad=[0, {1, 2}]))
    assert runtime.execute("return state.n", state_of()) == 1


def test_reading_a_value_too_large_for_max_memory_is_a_memory_error():
    runtime = LuaRuntime(max_memory=4 * 2**20)
    big = ["x" * 100 + str(i) for i in range(100_000)]
    assert runtime.execute("return state.n", {"n": 1, "big": big}) == 1
    with pytest.raises(LuaMemoryError):
        runtime.execute("local ok = pcall(function() return #state.big end) return ok",
                        {"n": 1, "big": big})
    assert runtime.execute("return 1 + 1") == 2


def test_encoding_a_huge_result_stops_at_the_deadline():
    # Conversion runs without the count hook, so it checks the clock itself.
    runtime = LuaRuntime(timeout=60)
    runtime.execute("big = {} for i = 1, 2000000 do big[i] = i + 0.5 end")
    started = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("return big", timeout=0.05)
    assert time.monotonic() - started < 2.0


def test_converting_a_value_read_lazily_is_not_charged_to_the_timeout():
    # Decoding a million items takes far longer than the limit; only Lua's own
    # work counts, as when the whole state was converted before the call.
    runtime = LuaRuntime(timeout=0.1)
    state = {"items": list(range(1_000_000))}
    assert runtime.execute_node_code("return {n = #state.items}", state) == {"n": 1_000_000}
    with pytest.raises(LuaTimeoutError):
        runtime.execute("local n = #state.items while true do end", state)


def test_states_that_are_not_all_string_keys_cross_whole(fetched):
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return state", {1: "a", "k": [1]}) == {1: "a", "k": [1]}
    assert runtime.execute("return #state", {1: "a", 2: "b"}) == 2
    assert fetched == []


# -- mixed lazy and materialized access against a model ---------------------

keys = st.sampled_from(["a", "b", "c", "d"])
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8)
operations = st.lists(st.one_of(
    st.tuples(st.just("read"), keys),
    st.tuples(st.just("rawget"), keys),
    st.tuples(st.just("write"), keys, st.integers(-5, 5)),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("rawset"), keys, st.integers(-5, 5)),
    st.tuples(st.just("count"),),
), max_size=8)


def lua_image(value):
    """What a value looks like after a trip through Lua: None dict values dropped."""
    if isinstance(value, dict):
        return {k: lua_image(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [lua_image(v) for v in value]
    return value


@settings(max_examples=80, deadline=None, database=None, derandomize=True)
@given(st.dictionaries(keys, values, min_size=1), operations)
def test_mixed_lazy_and_materialized_access_matches_a_plain_table(state, ops):
    model = lua_image(state)
    lines, expected = ["local seen = {}"], []
    for op in ops:
        kind, key = op[0], op[1] if len(op) > 1 else None
        if kind in ("read", "rawget"):
            fetch = f"state.{key}" if kind == "read" else f"rawget(state, '{key}')"
            lines.append(f"seen[#seen + 1] = {{{fetch}}}")
            expected.append([model[key]] if key in model else [])
        elif kind in ("write", "rawset"):
            value = op[2]
            lines.append(f"state.{key} = {value}" if kind == "write"
                         else f"rawset(state, '{key}', {value})")
            model[key] = value
        elif kind == "delete":
            lines.append(f"state.{key} = nil")
            model.pop(key, None)
        else:
            lines.append("local n = 0 for _ in pairs(state) do n = n + 1 end seen[#seen + 1] = {n}")
            expected.append([len(model)])
    lines.append("return {seen = seen, state = state}")
    result = LuaRuntime().execute_node_code("\n".join(lines), state)
    assert result.get("state", {}) == model
    # A list of empty tables comes back as a list of {} (an empty Lua table).
    assert [list(x.values()) if isinstance(x, dict) else x for x in result.get("seen", [])] \
        == [x if x else [] for x in expected]
