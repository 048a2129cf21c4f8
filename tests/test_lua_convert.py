"""Values crossing the Python/Lua boundary: exact types, containers, errors with paths."""

from __future__ import annotations

import enum
import math
import re
from collections import OrderedDict, defaultdict

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isobranch import END, START, LuaRuntime, StateGraph
from isobranch.errors import LuaConversionError, LuaRuntimeError
from isobranch.lua.convert import MAX_DEPTH, key_path
from isobranch.nodes import LuaNode


def round_trip(value):
    return LuaRuntime().execute_node_code("return state", {"v": value}).get("v")


def test_integer_and_float_subtypes_survive():
    runtime = LuaRuntime()
    assert runtime.execute_node_code(
        "return {i = math.type(state.i), f = math.type(state.f), back_i = 3, back_f = 3.0}",
        {"i": 1, "f": 1.0}) == {"i": "integer", "f": "float", "back_i": 3, "back_f": 3.0}
    back = runtime.execute_node_code("return {x = 3.0, y = 3}", {})
    assert type(back["x"]) is float and type(back["y"]) is int
    assert type(runtime.execute("return 2^53")) is float
    assert type(runtime.execute("return 7 // 2")) is int


@pytest.mark.parametrize("value", [
    0, -1, 1023, 1024, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**62, 2**63 - 1, -(2**63),
])
def test_integers_of_every_size_round_trip(value):
    assert round_trip(value) == value
    assert LuaRuntime().execute("return math.type(state.v)", {"v": value}) == "integer"


def test_special_floats_round_trip():
    for value in (math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 0.1):
        back = round_trip(value)
        assert back == value and math.copysign(1, back) == math.copysign(1, value)
    assert math.isnan(round_trip(math.nan))


def test_lists_dicts_and_empty_containers_round_trip():
    runtime = LuaRuntime()
    state = {"list": [1, 2, 3], "empty_list": [], "empty_dict": {}, "nested": [[[]], {"a": []}],
             "none_inside": [1, None, 3], "trailing_none": [1, None], "only_none": [None]}
    assert runtime.execute_node_code("return state", state) == state


def test_empty_list_stays_a_list_after_lua_empties_it():
    assert LuaRuntime().execute_node_code(
        "table.remove(state.l) table.remove(state.l) return state", {"l": [1, 2]}) == {"l": []}


def test_list_made_into_a_dict_by_lua_comes_back_as_a_dict():
    assert LuaRuntime().execute_node_code(
        "state.l.x = 1 return state", {"l": [1]}) == {"l": {1: 1, "x": 1}}


def test_unmarked_lua_tables():
    runtime = LuaRuntime()
    assert runtime.execute("return {}") == {}
    assert runtime.execute("return {10, 20}") == [10, 20]
    assert runtime.execute("return {[1] = 'a', [3] = 'c'}") == {1: "a", 3: "c"}
    assert runtime.execute("return {[2] = 'b', [1] = 'a'}") == ["a", "b"]
    assert runtime.execute("return {x = 1, [2] = 'two', [2.5] = 'f', [true] = 't'}") == {
        "x": 1, 2: "two", 2.5: "f", True: "t"}


def test_dict_keys_keep_their_types():
    state = {"k": {1: "one", 2.5: "two and a half", "s": "str", -3: "neg"}, "b": {True: "yes"}}
    result = LuaRuntime().execute_node_code("return state", state)
    assert result == state and type(next(iter(result["b"]))) is bool
    # A dict whose keys happen to be 1..n stays a dict.
    assert round_trip({1: "a", 2: "b"}) == {1: "a", 2: "b"}


def test_tuples_arrive_as_sequences():
    runtime = LuaRuntime()
    assert runtime.execute("return #state.t", {"t": (1, 2, 3)}) == 3
    assert round_trip((1, (2,), ())) == [1, [2], []]


def test_unicode_and_embedded_nul():
    text = "héllo wörld \u2013 😀 \x00 end \x07 \u2028 \U0010ffff"
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {t = state.t, n = #state.t}", {"t": text}) == {
        "t": text, "n": len(text.encode("utf-8"))}
    assert runtime.execute('return "\\u{1F600}"') == "😀"


def test_bytes_become_lua_strings():
    assert LuaRuntime().execute("return state.b .. '!'", {"b": b"raw\x00"}) == "raw\x00!"


def test_mapping_and_scalar_subclasses_are_accepted():
    class Color(enum.IntEnum):
        RED = 1

    class Text(str):
        def __str__(self):
            return "wrong"

    runtime = LuaRuntime()
    assert runtime.execute("return state.a", OrderedDict(a=1)) == 1
    assert runtime.execute_node_code(
        "return state", {"d": defaultdict(list, {"x": [1]}), "e": Color.RED, "t": Text("ok")}) == {
        "d": {"x": [1]}, "e": 1, "t": "ok"}


def test_deep_nesting_round_trips():
    value: list = []
    for _ in range(150):
        value = [value]
    assert round_trip(value) == value


def test_scalar_results():
    runtime = LuaRuntime()
    assert runtime.execute("return nil") is None
    assert runtime.execute("return true") is True
    assert runtime.execute("return 'x'") == "x"
    assert runtime.execute("return 1, 2") == 1


@pytest.mark.parametrize(("state", "message"), [
    ({"a": {"b": [1, 2, 3, {1, 2}]}},
     "state['a']['b'][3]: cannot convert object of type set to Lua"),
    ({"big": [2**70]}, "state['big'][0]: integer"),
    ({"small": -(2**63) - 1}, "state['small']: integer"),
    ({"k": {None: 1}}, "state['k'][None]:"),
    ({"k": {math.nan: 1}}, "state['k'][nan]: NaN"),
    ({"k": {(1, 2): 1}}, "state['k'][(1, 2)]:"),
    ({"obj": object()}, "state['obj']: cannot convert object of type object to Lua"),
    ({"f": len}, "state['f']:"),
    ({"c": 1j}, "state['c']:"),
])
@pytest.mark.parametrize("code", [
    "for _ in pairs(state) do end return 1",
    "local _, v = next(state) return 1",
    "local ok = pcall(function() for k in pairs(state) do local _ = state[k] end end) return ok",
])
def test_unconvertible_python_values_name_their_path(state, message, code):
    # A value is converted when Lua first reads it; catching the error in
    # Lua does not save the call.
    with pytest.raises(LuaConversionError) as info:
        LuaRuntime().execute(code, state)
    assert str(info.value).startswith(message)


def test_unconvertible_variables_name_their_path():
    with pytest.raises(LuaConversionError, match=r"^variables\['x'\]"):
        LuaRuntime().execute("return 1", {}, variables={"x": {1}})


def test_python_cycles_are_named():
    state = {"loop": []}
    state["loop"].append(state)
    with pytest.raises(LuaConversionError, match=r"state\['loop'\]\[0\]: cycle"):
        LuaRuntime().execute("return state.loop", state)


def test_shared_python_containers_are_not_cycles():
    shared = [1, 2]
    assert LuaRuntime().execute_node_code("return state", {"a": shared, "b": shared}) == {
        "a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(("code", "fragment"), [
    ("local t = {a = {}} t.a.back = t return t", "result['a']['back']: cycle"),
    ("return {f = print}", "result['f']: cannot convert a Lua function"),
    ("return {co = coroutine.create(function() end)}", "cannot convert a Lua thread"),
    ("return {[{}] = 1}", "a table cannot be a Python dict key"),
    ("return {1, 2, {3, print}}", "result[3][2]: cannot convert a Lua function"),
    ("return print", "result: cannot convert a Lua function"),
])
def test_unconvertible_lua_values_name_their_path(code, fragment):
    with pytest.raises(LuaConversionError) as info:
        LuaRuntime().execute(code)
    assert fragment in str(info.value)


@pytest.mark.parametrize("back_to", [2, 25, 38])
def test_a_lua_cycle_closing_deep_in_a_result_is_named_where_it_closes(back_to):
    """Shallow and deep ancestors are checked in different ways (compared one
    by one, or looked up in a set): a cycle back to either is found at once,
    not reported as nesting past the depth limit."""
    code = f"""local root = {{}}
    local chain, t = {{root}}, root
    for i = 2, 40 do local inner = {{}} t.next = inner t = inner chain[i] = inner end
    t.back = chain[{back_to}]
    return root"""
    with pytest.raises(LuaConversionError) as info:
        LuaRuntime().execute(code)
    # The path is shortened as every long path is: its ends and the count.
    assert str(info.value).endswith("...(33 more)...['next']['next']['back']: "
                                    "cycle (a table that contains itself)")


def test_conversion_error_is_a_runtime_error_and_the_vm_survives():
    runtime = LuaRuntime()
    runtime.execute("kept = 1")
    with pytest.raises(LuaRuntimeError):
        runtime.execute("return {f = print}")
    with pytest.raises(LuaRuntimeError):
        runtime.execute("return state.s", {"s": {1}})
    assert runtime.execute("return kept") == 1


def test_invalid_utf8_from_lua_is_a_conversion_error():
    with pytest.raises(LuaConversionError, match="UTF-8"):
        LuaRuntime().execute('return "\\255"')
    with pytest.raises(LuaConversionError, match="UTF-8"):
        LuaRuntime().execute('return {s = "\\255"}')


def test_execute_node_code_result_shapes():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {a = 1}", {}) == {"a": 1}
    assert runtime.execute_node_code("return {1, 2}", {}) == {"result": [1, 2]}
    assert runtime.execute_node_code("return {}", {}) == {}
    assert runtime.execute_node_code("return 'x'", {}) == {"result": "x"}
    assert runtime.execute_node_code("return state.l", {"l": []}) == {"result": []}


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


def same_types(a, b) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            same_types(k, next(k2 for k2 in b if k2 == k)) and same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_types(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(json_like)
@example({"": None, 1: False})
@example({1: "one", 2: "two"})
@example({"": [], 1: {"": False}})  # a table tried as a list first, with a key seen before
@example([[], {}, [None], 0.0, -0.0, 1.0, True, 1])
def test_round_trip_property(value):
    result = LuaRuntime().execute_node_code("return state", {"v": value})
    assert same_types(result, without_none_values({"v": value}))


def nested_dicts(levels: int) -> dict:
    """``levels`` dicts, each the value of the key "a" in the one above it."""
    outer: dict = {}
    inner = outer
    for _ in range(levels - 1):
        inner["a"] = {}
        inner = inner["a"]
    return outer


def test_nesting_up_to_the_depth_limit_crosses_both_ways():
    runtime = LuaRuntime()
    assert runtime.execute("return state", nested_dicts(MAX_DEPTH)) == nested_dicts(MAX_DEPTH)
    built = runtime.execute(f"local t = {{}} for i = 2, {MAX_DEPTH} do t = {{a = t}} end return t")
    assert built == nested_dicts(MAX_DEPTH)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 1_000, 100_000])
def test_python_state_nested_too_deeply_names_its_path_and_the_limit(levels):
    runtime = LuaRuntime()
    with pytest.raises(LuaConversionError) as info:
        runtime.execute_node_code("return {seen = state.deep ~= nil}", {"deep": nested_dicts(levels)})
    message = str(info.value)
    # The path to the first container past the limit, its middle left out.
    assert message.startswith("state['deep']['a']['a']['a']...(")
    assert f"deeper than {MAX_DEPTH} levels" in message and len(message) < 300
    assert runtime.execute("return 1 + 1") == 2


def test_lua_result_nested_too_deeply_names_its_path_and_the_limit():
    runtime = LuaRuntime()
    with pytest.raises(LuaConversionError) as info:
        runtime.execute_node_code("local t = {} for i = 1, 200000 do t = {t} end "
                                  "return {deep = t}", {})
    message = str(info.value)
    assert message.startswith("result['deep'][1][1][1]...(")
    assert f"deeper than {MAX_DEPTH} levels" in message and len(message) < 300
    assert runtime.execute("return 1 + 1") == 2


def test_the_depth_limit_path_is_shortened_the_same_way_on_both_sides():
    assert key_path("state", [f"[{i}]" for i in range(3)]) == "state[0][1][2]"
    assert key_path("state", [f"[{i}]" for i in range(20)]) == "state[0][1][2][3]...(13 more)...[17][18][19]"
    runtime = LuaRuntime()
    with pytest.raises(LuaConversionError, match=re.escape(
            "result[1][2][3][4]...(13 more)...[18][19][20]: cannot convert a Lua function")):
        runtime.execute("local t = {} local inner = t for i = 1, 19 do "
                        "local next_t = {} for j = 1, i do next_t[j] = 0 end "
                        "inner[#inner] = nil inner[i] = next_t inner = next_t end "
                        "inner[20] = print for j = 1, 19 do inner[j] = 0 end return t")


def _deep_graph(kind: str) -> StateGraph:
    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_fan_in_node("join", lambda state, results: {"results": results})
    if kind == "python state":
        graph.add_node("make", lambda state: {"deep": nested_dicts(100_000)})
        graph.add_node("use", LuaNode("use", "return {seen = state.deep ~= nil}"))
        graph.add_parallel_edge("start", "make", fan_in="join")
        graph.add_edge("make", "use").add_edge("use", "join")
    else:
        graph.add_node("use", LuaNode("use", "local t = {} for i = 1, 200000 do t = {t} end "
                                             "return {deep = t}"))
        graph.add_parallel_edge("start", "use", fan_in="join")
    graph.add_node("sibling", LuaNode("sibling", "return {sum = 1 + 1}"))
    graph.add_parallel_edge("start", "sibling", fan_in="join")
    graph.add_edge(START, "start").add_edge("join", END)
    return graph


@pytest.mark.parametrize("kind", ["python state", "lua result"])
def test_nesting_past_the_limit_in_a_graph_names_node_branch_and_limit(isolation, kind):
    with _deep_graph(kind).compile(isolation=isolation) as compiled:
        failed, sibling = compiled.invoke({})["results"]
    assert not failed.success and failed.error_type == "LuaConversionError"
    assert failed.node == "use"
    assert failed.error.startswith(f"node 'use' in branch '{failed.branch}' failed")
    assert f"deeper than {MAX_DEPTH} levels" in failed.error
    assert ("state['deep']['a']" if kind == "python state" else "result['deep'][1]") in failed.error
    assert sibling.success and sibling.state["sum"] == 2


def test_encoding_many_distinct_keys_keeps_the_vm_memory_bounded():
    """The encoder's memo tables live as long as the VM; fresh dict keys,
    list lengths and string lengths in every result must not pile up in
    them (Lua never removes strings from weak tables)."""
    runtime = LuaRuntime(max_memory=8 * 2**20)
    code = """local out, list, base = {}, {}, state.base
    for i = 1, 2000 do out["key-" .. (base + i)] = i end
    for i = 1, 40 do list[i] = string.rep("x", base // 100 + i) end
    out.list = list
    return out"""
    # 100 results of 2,000 new keys each: ~30 MB if every key stayed cached.
    for call in range(100):
        result = runtime.execute_node_code(code, {"base": call * 2000})
        assert len(result) == 2001 and result[f"key-{call * 2000 + 1}"] == 1


def test_large_results_joined_in_chunks_keep_list_lengths_and_trailing_none():
    """A result of many pieces is joined in chunks as it is written; every
    list's length is written before its items, a None tail included."""
    state = {"rows": [[i, f"row-{i}", None] for i in range(3000)] + [None],
             "tags": [["a"] * 5 for _ in range(2000)]}
    assert LuaRuntime().execute_node_code("return state", state) == state


def test_a_large_table_that_is_not_a_sequence_after_a_join_comes_back_as_a_dict():
    """A table with items 1..n and a string key, big enough that part of it
    is joined into a chunk before the string key is met: the encoder starts
    again and writes it as a dict, every key and value in place."""
    code = """local t = {}
    for i = 1, 3000 do t[i] = {i, "s"} end
    t.x = 1
    return {t = t, after = {1, 2, 3}}"""
    result = LuaRuntime().execute_node_code(code)
    assert result == {"t": {**{i: [i, "s"] for i in range(1, 3001)}, "x": 1},
                      "after": [1, 2, 3]}


def test_a_small_mixed_table_after_a_join_is_written_as_a_dict_in_place():
    """A small table that is not a sequence, met after earlier output was
    joined into chunks: only its own pieces are dropped and rewritten."""
    code = """local rows = {}
    for i = 1, 3000 do rows[i] = {i, "s"} end
    local mixed = {10, 20}
    mixed.n = 2
    rows[#rows + 1] = mixed
    return {rows = rows}"""
    result = LuaRuntime().execute_node_code(code)
    assert result["rows"][:3000] == [[i, "s"] for i in range(1, 3001)]
    assert result["rows"][3000] == {1: 10, 2: 20, "n": 2}
