"""The Lua time limit is unconditional: adversarial programs that try to outlive it.

Each test gives a short limit and asserts the call ends with LuaTimeoutError
before limit + MARGIN: this checks "does not hang", not speed.
"""

from __future__ import annotations

import threading
import time

import pytest

from isobranch import LuaMemoryError, LuaRuntime, LuaRuntimeError, LuaTimeoutError

LIMIT = 0.2
MARGIN = 5.0  # "it stopped", not "how fast": generous for a loaded 2-core CI machine

ESCAPES = {
    # plain loops
    "while loop": "while true do end",
    "repeat": "repeat until false",
    "numeric for to huge": "for i = 1, math.huge do end",
    "tail recursion": "local function f() return f() end return f()",
    "goto loop": "::top:: goto top",
    "stack overflow in a pcall loop":
        "local function f() return 1 + f() end while true do pcall(f) end",
    # catching the timeout error
    "pcall swallowing": "while true do pcall(function() while true do end end) end",
    "nested pcall": "while true do pcall(pcall, pcall, function() while true do end end) end",
    "pcall of error in loop": "while true do pcall(error, 'x') end",
    "xpcall looping handler":
        "while true do xpcall(function() while true do end end, "
        "function() while true do end end) end",
    "xpcall erroring handler":
        "while true do xpcall(function() while true do end end, function(e) error(e) end) end",
    "xpcall handler retrying the body":
        "local function body() while true do end end "
        "local function h(e) return xpcall(body, h) end "
        "while true do xpcall(body, h) end",
    "error with looping __tostring":
        "while true do pcall(error, setmetatable({}, {__tostring = function() "
        "while true do end end})) end",
    "pcall loop raising tables with looping __index":
        "while true do local ok, e = pcall(error, setmetatable({}, {__index = function() "
        "while true do end end})) local _ = e.x end",
    "catch the timeout and rethrow it later":
        "local caught while true do local ok, e = pcall(function() while true do end end) "
        "caught = e end",
    # coroutines
    "coroutine.wrap": "coroutine.wrap(function() while true do end end)()",
    "coroutine.create": "coroutine.resume(coroutine.create(function() while true do end end))",
    "coroutine catching":
        "local co = coroutine.create(function() while true do pcall(function() "
        "while true do end end) end end) while true do coroutine.resume(co) end",
    "nested coroutines":
        "coroutine.wrap(function() coroutine.wrap(function() while true do end end)() end)()",
    "yield ping-pong":
        "local co = coroutine.wrap(function() while true do coroutine.yield() end end) "
        "while true do co() end",
    "resume loop swallowing errors":
        "while true do local co = coroutine.create(function() while true do end end) "
        "pcall(coroutine.resume, co) end",
    "coroutine.close runs a looping <close> of a timed-out coroutine":
        "local co = coroutine.create(function() "
        "  local x <close> = setmetatable({}, {__close = function() while true do end end}) "
        "  while true do end end) "
        "coroutine.resume(co) coroutine.close(co)",
    "coroutine.wrap closes a looping <close> of a timed-out coroutine":
        "coroutine.wrap(function() "
        "  local x <close> = setmetatable({}, {__close = function() while true do end end}) "
        "  while true do end end)()",
    "coroutine created before the call resumed in a loop":
        "local co = coroutine.wrap(function() while true do end end) pcall(co) while true do end",
    # metamethods and callbacks
    "__close handler": "local x <close> = setmetatable({}, {__close = function() "
                       "while true do end end})",
    "__close that catches and loops":
        "local x <close> = setmetatable({}, {__close = function() "
        "while true do pcall(function() while true do end end) end end}) while true do end",
    "__index loop": "local t = setmetatable({}, {__index = function(t, k) "
                    "while true do end end}) return t.x",
    "__index chain": "local t = {} setmetatable(t, {__index = function(s, k) return s[k] end}) "
                     "while true do pcall(function() return t.x end) end",
    "__newindex loop": "local t = setmetatable({}, {__newindex = function() "
                       "while true do end end}) t.x = 1",
    "__eq loop": "local mt = {__eq = function() while true do end end} "
                 "return setmetatable({}, mt) == setmetatable({}, mt)",
    "__lt loop": "local mt = {__lt = function() while true do end end} "
                 "return setmetatable({}, mt) < setmetatable({}, mt)",
    "__concat loop": "return setmetatable({}, {__concat = function() while true do end end}) .. 'x'",
    "__len loop": "return #setmetatable({}, {__len = function() while true do end end})",
    "__call loop": "setmetatable({}, {__call = function() while true do end end})()",
    "__tostring via tostring": "tostring(setmetatable({}, {__tostring = function() "
                               "while true do end end}))",
    "gsub callback": "string.gsub(string.rep('a', 10), 'a', function() while true do end end)",
    "sort comparator": "table.sort({3, 1, 2, 5, 4}, function(a, b) while true do end end)",
    "load reader": "while true do load(function() while true do end end) end",
    "loaded chunk": "load('while true do end')()",
    # expensive C calls in a loop
    "string.rep churn": "while true do local s = string.rep('x', 1e5) end",
    "table growth churn": "while true do local t = {} for i = 1, 1000 do t[i] = i end end",
    "tostring in loop": "while true do tostring({}) end",
    "table.concat churn": "local t = {} for i = 1, 1000 do t[i] = 'ab' end "
                          "while true do table.concat(t) end",
    "string.find churn": "local s = string.rep('a', 1e4) while true do s:find('b') end",
}


@pytest.mark.parametrize("code", ESCAPES.values(), ids=ESCAPES.keys())
def test_no_lua_program_outlives_its_timeout(code):
    runtime = LuaRuntime(timeout=LIMIT)
    runtime.execute("kept = 1")
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError, match="timeout"):
        runtime.execute(code)
    assert time.monotonic() - start < LIMIT + MARGIN
    # The VM was discarded: globals are gone and the runtime works again.
    assert runtime.execute("return kept") is None
    assert runtime.execute("return 40 + 2") == 42


def test_timeout_error_is_a_runtime_error_subclass():
    with pytest.raises(LuaRuntimeError):
        LuaRuntime(timeout=LIMIT).execute("while true do end")


def test_an_uncaught_error_object_with_looping_metamethods_is_reported_at_once():
    runtime = LuaRuntime(timeout=LIMIT)
    looping = "function() while true do end end"
    with pytest.raises(LuaRuntimeError, match="error object is a table") as info:
        runtime.execute(f"error(setmetatable({{}}, {{__index = {looping}, "
                        f"__tostring = {looping}, __concat = {looping}}}))")
    assert not isinstance(info.value, LuaTimeoutError)


def test_timeout_in_node_code_and_conditions():
    runtime = LuaRuntime(timeout=LIMIT)
    with pytest.raises(LuaTimeoutError):
        runtime.execute_node_code("while true do end", {"x": 1})
    with pytest.raises(LuaTimeoutError):
        runtime.eval_condition("(function() while true do end end)()", {})
    assert runtime.execute_node_code("return {ok = true}", {}) == {"ok": True}


def test_timeout_is_per_call_not_per_runtime():
    runtime = LuaRuntime(timeout=LIMIT)
    for _ in range(4):  # together longer than the limit, each well inside it
        assert runtime.execute("local s = 0 for i = 1, 1e5 do s = s + i end return s") == 5000050000


def test_a_caught_timeout_still_fails_the_call():
    runtime = LuaRuntime(timeout=LIMIT)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("pcall(function() while true do end end) return 'escaped'")
    assert time.monotonic() - start < LIMIT + MARGIN


def test_closing_a_coroutine_after_a_timeout_is_refused():
    runtime = LuaRuntime(timeout=LIMIT)
    with pytest.raises(LuaTimeoutError):
        runtime.execute(
            "local co = coroutine.create(function() while true do end end) "
            "local ok = coroutine.resume(co) "
            "local closed, err = pcall(coroutine.close, co) "
            "while true do end")


def test_globals_metatable_cannot_run_code_before_the_hook_is_armed():
    runtime = LuaRuntime(timeout=LIMIT)
    runtime.execute("state = nil variables = nil "
                    "setmetatable(_G, {__newindex = function() while true do end end})")
    start = time.monotonic()
    assert runtime.execute("return state.a", {"a": 1}, variables={"v": 1}) == 1
    assert time.monotonic() - start < LIMIT + MARGIN


def test_huge_return_value_is_bounded_by_the_timeout_or_memory():
    runtime = LuaRuntime(timeout=LIMIT, max_memory=64 * 2**20)
    start = time.monotonic()
    with pytest.raises((LuaTimeoutError, LuaMemoryError)):
        runtime.execute("local t = {} for i = 1, 1e9 do t[i] = {i} end return t")
    assert time.monotonic() - start < LIMIT + MARGIN
    assert runtime.execute("return 1") == 1


def test_encoding_a_return_value_runs_under_the_timeout():
    # Building is quick; encoding the result is what takes long.
    runtime = LuaRuntime(timeout=0.05, max_memory=None)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("local s = string.rep('x', 10) local t = {} "
                        "for i = 1, 2e5 do t[i] = {s, i, i + 0.5} end "
                        "local r = {} for i = 1, 40 do r[i] = t end return r")
    assert time.monotonic() - start < 0.05 + MARGIN


def test_per_call_timeout_overrides_the_default():
    runtime = LuaRuntime(timeout=60)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("while true do end", timeout=0.2)
    assert time.monotonic() - start < 0.2 + MARGIN


def test_should_stop_cancels_a_running_call():
    stop = threading.Event()
    runtime = LuaRuntime(timeout=None, should_stop=stop.is_set)
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(LuaTimeoutError, match="stopped"):
            runtime.execute("while true do end")
    finally:
        timer.cancel()
    assert time.monotonic() - start < 0.2 + MARGIN


def test_timeouts_in_threads_are_independent():
    """One runaway runtime times out while another, in parallel, finishes normally."""
    outcome = {}

    def spin():
        try:
            LuaRuntime(timeout=LIMIT).execute("while true do end")
        except LuaTimeoutError:
            outcome["spin"] = "timeout"

    def work():
        outcome["work"] = LuaRuntime(timeout=30).execute(
            "local s = 0 for i = 1, 2e6 do s = s + i end return s")

    threads = [threading.Thread(target=spin), threading.Thread(target=work)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcome == {"spin": "timeout", "work": 2_000_001_000_000}


def test_no_timeout_means_no_hook():
    runtime = LuaRuntime(timeout=None)
    assert runtime.execute("local s = 0 for i = 1, 1e6 do s = s + 1 end return s") == 1_000_000


def test_timeout_hook_false_installs_no_hook():
    # Without a hook a 0.05 s limit is not enforced by the runtime itself
    # (a process backend kills the worker instead): this loop completes.
    runtime = LuaRuntime(timeout=0.05, timeout_hook=False)
    assert runtime.execute("local s = 0 for i = 1, 3e6 do s = s + 1 end return s") == 3_000_000


def test_memory_error_discards_the_vm_and_the_runtime_recovers():
    runtime = LuaRuntime(timeout=5, max_memory=16 * 2**20)
    runtime.execute("kept = 1")
    with pytest.raises(LuaMemoryError):
        runtime.execute("local t = {} for i = 1, 1e8 do t[i] = string.rep('x', 64) .. i end")
    assert runtime.execute("return kept") is None
    assert runtime.execute("return 1 + 1") == 2
