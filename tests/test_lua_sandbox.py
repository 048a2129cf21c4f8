"""The Lua sandbox: what user code can and cannot reach."""

from __future__ import annotations

import time

import pytest

from isobranch import LuaRuntime, LuaRuntimeError, LuaTimeoutError


@pytest.mark.parametrize("name", [
    "python", "io", "debug", "package", "require", "dofile", "loadfile"])
def test_dangerous_globals_are_gone(name):
    assert LuaRuntime().execute(f"return {name} == nil") is True


def test_python_is_unreachable_by_any_name():
    # lupa registers `python` as a global and in package.loaded; both are gone,
    # and nothing reachable from _G is a Python object (userdata).
    runtime = LuaRuntime()
    assert runtime.execute("return rawget(_G, 'python') == nil and package == nil "
                           "and require == nil") is True
    kinds = runtime.execute_node_code(
        "local seen, odd = {}, {} "
        "local function walk(t, depth) "
        "  if seen[t] then return end seen[t] = true "
        "  for k, v in pairs(t) do "
        "    local kind = type(v) "
        "    if kind == 'userdata' or type(k) == 'userdata' then odd[#odd + 1] = tostring(k) end "
        "    if kind == 'table' and depth < 4 then walk(v, depth + 1) end "
        "  end "
        "end "
        "walk(_G, 0) walk(state, 0) walk(variables, 0) "
        "return {odd = odd}", {"nested": {"list": [1, {"x": None}]}}, variables={"v": [1]})
    assert kinds == {"odd": {}}


def test_os_keeps_only_time_clock_date():
    runtime = LuaRuntime()
    assert runtime.execute("local k = {} for name in pairs(os) do k[#k+1] = name end "
                           "table.sort(k) return k") == ["clock", "date", "time"]
    assert isinstance(runtime.execute("return os.time()"), int)
    assert isinstance(runtime.execute("return os.clock()"), float)
    assert isinstance(runtime.execute("return os.date('%Y')"), str)


def test_string_dump_is_gone_even_through_the_string_metatable():
    runtime = LuaRuntime()
    assert runtime.execute('return ("").dump == nil and string.dump == nil') is True


def test_string_metatable_is_protected():
    runtime = LuaRuntime()
    assert runtime.execute("return getmetatable('')") is False
    with pytest.raises(LuaRuntimeError, match="table expected"):
        runtime.execute("setmetatable('', {})")
    # String methods still work through it.
    assert runtime.execute("return ('abc'):upper()") == "ABC"


def test_binary_chunks_are_refused():
    runtime = LuaRuntime()
    result = runtime.execute('local f, err = load("\\27Lua", "x", "b") return err')
    assert "binary" in result


def test_load_keeps_its_env_argument_and_text_chunks_work():
    runtime = LuaRuntime()
    assert runtime.execute('return load("return x", "c", "t", {x = 5})()') == 5
    assert runtime.execute('y = 9 return load("return y")()') == 9
    assert runtime.execute('local f, err = load("return +") return err').startswith(
        '[string "return +"]:1:')


def test_collectgarbage_allows_only_count():
    runtime = LuaRuntime()
    assert isinstance(runtime.execute('return collectgarbage("count")'), float)
    for option in ("", '"collect"', '"stop"', '"step"', '"incremental"'):
        with pytest.raises(LuaRuntimeError, match="only \"count\""):
            runtime.execute(f"collectgarbage({option})")


@pytest.mark.parametrize("gc_value", ["function() end", "false", "true"])
def test_gc_metamethods_are_refused(gc_value):
    with pytest.raises(LuaRuntimeError, match="__gc"):
        LuaRuntime().execute(f"setmetatable({{}}, {{__gc = {gc_value}}})")


def test_other_metatables_still_work():
    runtime = LuaRuntime()
    assert runtime.execute(
        "local v = setmetatable({}, {__index = function(t, k) return k .. '!' end}) "
        "return v.hi") == "hi!"
    assert runtime.execute("local t = setmetatable({}, {__mode = 'k'}) return getmetatable(t).__mode") == "k"


def test_a_looping_finalizer_added_after_setmetatable_never_runs():
    # Lua 5.4 marks objects for finalization only when setmetatable sees __gc.
    runtime = LuaRuntime(timeout=0.3)
    start = time.monotonic()
    runtime.execute("local mt = {} for i = 1, 100 do setmetatable({}, mt) end "
                    "mt.__gc = function() while true do end end "
                    "for i = 1, 1e5 do local t = {i} end")
    assert runtime.execute("return 1") == 1
    assert time.monotonic() - start < 5.3


def test_converted_tables_carry_no_metatable():
    # A marker metatable reachable from user code could be given __gc or
    # __newindex, running user code where no hook can stop it.
    runtime = LuaRuntime()
    assert runtime.execute_node_code(
        "return {getmetatable(state.list) == nil, getmetatable(state.dict) == nil, "
        "getmetatable(state.empty) == nil, getmetatable(state.holes) == nil, "
        "getmetatable(state.ints) == nil}",
        {"list": [1], "dict": {"a": 1}, "empty": [], "holes": [1, None], "ints": {1: "a"}},
    ) == {"result": [True] * 5}


def test_user_metatables_on_state_tables_cannot_hijack_later_conversions():
    runtime = LuaRuntime(timeout=0.3)
    runtime.execute(
        "local loop = function() while true do end end "
        "setmetatable(state.l, {__newindex = loop, __index = loop}) "
        "kept = state.l", {"l": [1]})
    start = time.monotonic()
    for _ in range(3):
        assert runtime.execute_node_code("return state", {"l": [1, [2]], "d": {}}) == {
            "l": [1, [2]], "d": {}}
    assert time.monotonic() - start < 5.3


def test_replacing_globals_does_not_break_the_runtime():
    runtime = LuaRuntime(timeout=0.3)
    runtime.execute(
        "for _, name in ipairs({'pcall', 'xpcall', 'error', 'type', 'next', 'pairs', "
        "'rawget', 'rawset', 'rawlen', 'tostring', 'setmetatable', 'getmetatable', 'load', "
        "'select'}) do _G[name] = function() while true do end end end "
        "string.sub = nil string.byte = nil string.unpack = nil string.pack = nil "
        "string.find = nil string.format = nil table.concat = nil table.unpack = nil "
        "math.type = nil coroutine.resume = nil os.clock = nil")
    assert runtime.execute_node_code(
        "return {v = state.v, l = state.l}", {"v": 1.5, "l": ["x"]}) == {"v": 1.5, "l": ["x"]}
    with pytest.raises(LuaTimeoutError):
        runtime.execute("while true do end")


def test_replacing_coroutine_functions_keeps_coroutines_hooked():
    runtime = LuaRuntime(timeout=0.3)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("local create = coroutine.create coroutine.create = nil "
                        "coroutine.resume(create(function() while true do end end))")
    assert time.monotonic() - start < 5.3


def test_library_tables_are_per_runtime():
    first, second = LuaRuntime(), LuaRuntime()
    first.execute("string.extra = 'x'; table.insert = nil")
    assert second.execute("return string.extra == nil and table.insert ~= nil") is True


def test_coroutines_still_work_normally():
    runtime = LuaRuntime()
    assert runtime.execute(
        "local gen = coroutine.wrap(function() for i = 1, 3 do coroutine.yield(i) end end) "
        "return {gen(), gen(), gen()}") == [1, 2, 3]
    assert runtime.execute(
        "local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) return b * 2 end) "
        "local _, x = coroutine.resume(co, 1) local _, y = coroutine.resume(co, 10) "
        "return {x, y, coroutine.status(co), coroutine.close(co)}") == [2, 20, "dead", True]
    with pytest.raises(LuaRuntimeError, match=r"lua:1: boom"):
        runtime.execute("coroutine.wrap(function() error('boom') end)()")


def test_coroutine_wrap_closes_to_be_closed_variables_on_error():
    runtime = LuaRuntime()
    assert runtime.execute(
        "closed = false "
        "pcall(coroutine.wrap(function() "
        "  local x <close> = setmetatable({}, {__close = function() closed = true end}) "
        "  error('x') end)) "
        "return closed") is True


def test_xpcall_handler_runs_for_ordinary_errors():
    assert LuaRuntime().execute(
        "return select(2, xpcall(function() error('e', 0) end, function(m) return m .. '!' end))"
    ) == "e!"


def test_library_functions_loaded_on_first_use_report_errors_at_the_callers_line():
    # rawget, xpcall, the coroutine functions... are stubs until their first
    # call loads them: a stub must hand over in a tail call, or its errors
    # would point into the sandbox instead of at the line that called it.
    calls = ["rawget(5)", "rawset(5)", "getmetatable()", "coroutine.create(5)",
             "coroutine.wrap(5)", "xpcall(print)", 'collectgarbage("stop")']
    lines = [f"local ok{n}, e{n} = pcall(function() local r = {call} return r end)"
             for n, call in enumerate(calls)]
    code = "\n".join(lines) + "\nreturn {" + ", ".join(f"e{n}" for n in range(len(calls))) + "}"
    messages = LuaRuntime().execute(code, chunk_name="user")
    assert [message.split(" ", 1)[0] for message in messages] == [
        f"user:{n + 1}:" for n in range(len(calls))]


@pytest.mark.parametrize(("code", "message"), [
    ("local x = 1\nnext(nil)", "lua:2: bad argument #1 to 'next' (table expected, got nil)"),
    ("local x = 1\npairs(5)", "lua:2: bad argument #1 to 'pairs' (table expected, got number)"),
    ("local x = 1\nnext()", "lua:2: bad argument #1 to 'next' (table expected, got no value)"),
])
def test_next_and_pairs_argument_errors_name_the_callers_line(code, message):
    # The error is raised by a function loaded on first use (rarely_used.lua),
    # here in a fresh VM that has loaded nothing yet: the message and the
    # line are still Lua's own, at the caller.
    runtime = LuaRuntime()
    with pytest.raises(LuaRuntimeError) as info:
        runtime.execute(code)
    assert str(info.value).startswith(message)


def test_callables_reach_the_vm_without_lupas_getitem_probe(monkeypatch):
    # Every Python callable the sandbox holds is wrapped as an attribute
    # getter, so lupa does not probe it for __getitem__ (see _for_lua);
    # the calls through it still work: a hook firing asks the clock.
    from isobranch.lua import runtime as runtime_module
    wrapped = []
    real = runtime_module._for_lua
    monkeypatch.setattr(runtime_module, "_for_lua",
                        lambda method: wrapped.append(method.__name__) or real(method))
    runtime = LuaRuntime(timeout=5.0, deadline_listener=lambda deadline: None)
    assert runtime.execute("local n = 0 for i = 1, 200000 do n = n + i end return n") \
        == 200000 * 200001 // 2
    assert runtime.execute_node_code("return {v = state.k}", {"k": 3}) == {"v": 3}
    assert set(wrapped) == {"_out_of_time", "_armed", "_fetch_state_value"}
