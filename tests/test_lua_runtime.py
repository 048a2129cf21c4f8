"""LuaRuntime: seed unit scenarios PY-002-UNIT-001..004, sandbox, errors, conversion."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isobranch import LuaMemoryError, LuaRuntime, LuaRuntimeError
from isobranch.lua.runtime import LuaConversionError


def test_PY_002_UNIT_001_lua_runtime_instances_are_independent():
    runtime1 = LuaRuntime()
    runtime2 = LuaRuntime()
    runtime1.execute("test_global = 'from_runtime1'", {})
    assert runtime2.execute("return test_global", {}) is None
    assert runtime1.execute("return test_global", {}) == "from_runtime1"


def test_PY_002_UNIT_002_global_variable_does_not_leak():
    runtime1 = LuaRuntime()
    runtime1.execute("leaked_global = 123", {})
    runtime2 = LuaRuntime()
    assert runtime2.execute("return leaked_global", {}) is None


def test_PY_002_UNIT_003_function_does_not_leak():
    runtime1 = LuaRuntime()
    runtime1.execute("function helper() return 42 end", {})
    assert runtime1.execute("return helper()") == 42
    runtime2 = LuaRuntime()
    with pytest.raises(LuaRuntimeError, match="attempt to call a nil value"):
        runtime2.execute("return helper()", {})


def test_PY_002_UNIT_004_state_correctly_injected():
    runtime = LuaRuntime()
    assert runtime.execute("return state.value", {"value": 10}) == 10
    assert runtime.execute("return state.value", {"value": 20}) == 20


def test_library_tables_are_per_runtime():
    first, second = LuaRuntime(), LuaRuntime()
    first.execute("string.extra = 'x'; table.insert = nil")
    assert second.execute("return string.extra == nil and table.insert ~= nil") is True


def test_execute_node_code_state_is_a_local_and_returns_updates():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {doubled = state.n * 2}", {"n": 4}) == {"doubled": 8}
    assert runtime.execute("return state") is None, "node state must not become a global"
    assert runtime.execute_node_code("local x = 1", {}) == {}
    assert runtime.execute_node_code("return 7", {}) == {"result": 7}
    assert runtime.execute_node_code("return {1, 2}", {}) == {"result": [1, 2]}


def test_eval_condition_forms():
    runtime = LuaRuntime()
    assert runtime.eval_condition("state.x > 1", {"x": 2}) == "true"
    assert runtime.eval_condition("return state.x > 1", {"x": 0}) == "false"
    assert runtime.eval_condition("state.label", {"label": "go"}) == "go"
    assert runtime.eval_condition("state.missing", {}) is None
    assert runtime.eval_condition("state.x + 1", {"x": 1}) == "2"


def test_variables_are_visible():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {v = variables.k}", {}, variables={"k": 3}) == {"v": 3}
    assert runtime.execute("return variables.k", {}, variables={"k": "x"}) == "x"


@pytest.mark.parametrize("name", [
    "python", "io", "debug", "package", "require", "dofile", "loadfile"])
def test_dangerous_globals_are_gone(name):
    assert LuaRuntime().execute(f"return {name} == nil") is True


def test_os_keeps_only_time_clock_date():
    runtime = LuaRuntime()
    assert runtime.execute("local k = {} for name in pairs(os) do k[#k+1] = name end "
                           "table.sort(k) return k") == ["clock", "date", "time"]
    assert isinstance(runtime.execute("return os.time()"), int)


def test_string_dump_is_gone_even_through_the_string_metatable():
    runtime = LuaRuntime()
    assert runtime.execute('return ("").dump == nil and string.dump == nil') is True
    assert runtime.execute("return getmetatable('')") is False


def test_binary_chunks_are_refused():
    runtime = LuaRuntime()
    result = runtime.execute('local f, err = load("\\27Lua", "x", "b") return err')
    assert "binary" in result


def test_load_keeps_its_env_argument():
    runtime = LuaRuntime()
    assert runtime.execute('return load("return x", "c", "t", {x = 5})()') == 5
    assert runtime.execute('y = 9 return load("return y")()') == 9


def test_collectgarbage_allows_only_count():
    runtime = LuaRuntime()
    assert isinstance(runtime.execute('return collectgarbage("count")'), float)
    with pytest.raises(LuaRuntimeError, match="only \"count\""):
        runtime.execute("collectgarbage()")


def test_gc_metamethods_are_refused():
    with pytest.raises(LuaRuntimeError, match="__gc"):
        LuaRuntime().execute("setmetatable({}, {__gc = function() end})")


def test_no_python_object_reaches_lua():
    runtime = LuaRuntime()
    kinds = runtime.execute_node_code(
        "local seen = {} "
        "local function walk(t, depth) "
        "  for k, v in pairs(t) do "
        "    seen[#seen + 1] = type(v) "
        "    if type(v) == 'table' and depth < 3 and v ~= _G then walk(v, depth + 1) end "
        "  end "
        "end "
        "walk(_G, 0) walk(state, 0) "
        "local odd = {} for _, k in ipairs(seen) do "
        "  if k == 'userdata' then odd[#odd + 1] = k end end "
        "return {odd = odd}", {"nested": {"list": [1, {"x": None}]}})
    assert kinds == {"odd": {}}


def test_errors_keep_the_line_number_and_chunk_name():
    runtime = LuaRuntime()
    with pytest.raises(LuaRuntimeError) as info:
        runtime.execute_node_code("local a = 1\nlocal b = nil\nreturn b.x", {}, chunk_name="my_node")
    assert str(info.value).startswith("my_node:3:")
    with pytest.raises(LuaRuntimeError, match=r"my_node:2: .*near"):
        runtime.execute("x = 1\nthis is not lua", chunk_name="my_node")


def test_error_with_a_table_value_does_not_run_its_tostring():
    runtime = LuaRuntime(timeout=1)
    with pytest.raises(LuaRuntimeError, match="error object is a table"):
        runtime.execute("error(setmetatable({}, {__tostring = function() while true do end end}))")


def test_memory_limit_raises_and_the_runtime_recovers():
    runtime = LuaRuntime(max_memory=16 * 2**20)
    runtime.execute("kept = 1")
    with pytest.raises(LuaMemoryError):
        runtime.execute("local t = {} for i = 1, 1e8 do t[i] = string.rep('x', 64) .. i end")
    assert runtime.execute("return kept") is None, "the VM is replaced after a limit error"
    assert runtime.execute("return 1 + 1") == 2


def test_memory_error_caught_inside_lua_is_the_programs_business():
    runtime = LuaRuntime(max_memory=16 * 2**20)
    result = runtime.execute("local ok = pcall(string.rep, 'x', 64 * 1024 * 1024) return ok")
    assert result is False


# -- conversion --------------------------------------------------------------

def test_integer_and_float_subtypes_survive():
    runtime = LuaRuntime()
    assert runtime.execute_node_code(
        "return {i = math.type(state.i), f = math.type(state.f), back_i = 3, back_f = 3.0}",
        {"i": 1, "f": 1.0}) == {"i": "integer", "f": "float", "back_i": 3, "back_f": 3.0}
    back = runtime.execute_node_code("return {x = 3.0}", {})["x"]
    assert isinstance(back, float)


def test_lists_dicts_and_empty_containers_round_trip():
    runtime = LuaRuntime()
    state = {"list": [1, 2, 3], "empty_list": [], "empty_dict": {}, "nested": [[[]], {"a": []}],
             "none_inside": [1, None, 3], "trailing_none": [1, None]}
    assert runtime.execute_node_code("return state", state) == state


def test_unmarked_lua_tables():
    runtime = LuaRuntime()
    assert runtime.execute("return {}") == {}
    assert runtime.execute("return {10, 20}") == [10, 20]
    assert runtime.execute("return {[1] = 'a', [3] = 'c'}") == {1: "a", 3: "c"}
    assert runtime.execute("return {x = 1, [2] = 'two', [2.5] = 'f'}") == {
        "x": 1, 2: "two", 2.5: "f"}


def test_non_string_keys_tuples_and_special_floats():
    runtime = LuaRuntime()
    state = {"keys": {1: "one", 2.5: "two and a half"}, "tuple": (1, 2),
             "inf": math.inf, "ninf": -math.inf, "big": 2**62, "small": -(2**63),
             "neg_zero": -0.0}
    result = runtime.execute_node_code("return state", state)
    assert result == {**state, "tuple": [1, 2]}
    assert math.isnan(runtime.execute_node_code("return state", {"n": math.nan})["n"])


def test_unicode_and_embedded_nul():
    text = "héllo wörld \u2013 😀 \x00 end \x07 \u2028"
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {t = state.t, n = #state.t}", {"t": text}) == {
        "t": text, "n": len(text.encode("utf-8"))}


def test_mapping_subclasses_are_accepted():
    assert LuaRuntime().execute("return state.a", OrderedDict(a=1)) == 1


@pytest.mark.parametrize(("state", "path"), [
    ({"a": {"b": [1, 2, {1, 2}]}}, "state['a']['b'][2]"),
    ({"big": [2**70]}, "state['big'][0]"),
    ({"k": {None: 1}}, "state['k'][None]"),
    ({"obj": object()}, "state['obj']"),
])
def test_unconvertible_python_values_name_their_path(state, path):
    with pytest.raises(LuaConversionError) as info:
        LuaRuntime().execute("return 1", state)
    assert str(info.value).startswith(path)


def test_python_cycles_are_named():
    state = {"loop": []}
    state["loop"].append(state)
    with pytest.raises(LuaConversionError, match=r"state\['loop'\]\[0\]: cycle"):
        LuaRuntime().execute("return 1", state)


@pytest.mark.parametrize(("code", "fragment"), [
    ("local t = {a = {}} t.a.back = t return t", "result['a']['back']: cycle"),
    ("return {f = print}", "result['f']: cannot convert a Lua function"),
    ("return {co = coroutine.create(function() end)}", "cannot convert a Lua thread"),
    ("return {[{}] = 1}", "a table cannot be a Python dict key"),
])
def test_unconvertible_lua_values_name_their_path(code, fragment):
    with pytest.raises(LuaConversionError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        LuaRuntime().execute(code)


def test_invalid_utf8_from_lua_is_a_conversion_error():
    with pytest.raises(LuaConversionError, match="UTF-8"):
        LuaRuntime().execute('return "\\255"')


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=5),
    max_leaves=25)


def without_none_values(value):
    """Lua tables cannot hold nil: a dict entry whose value is None disappears."""
    if isinstance(value, dict):
        return {k: without_none_values(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none_values(v) for v in value]
    return value


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(json_like)
@example({"": None, 1: False})
@example({1: "one", 2: "two"})
def test_round_trip_property(value):
    runtime = LuaRuntime()
    result = runtime.execute_node_code("return state", {"v": value})
    assert result == without_none_values({"v": value})
    if isinstance(value, float):
        assert isinstance(result["v"], float)
