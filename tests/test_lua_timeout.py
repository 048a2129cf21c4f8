"""The Lua time limit is unconditional: adversarial programs that try to outlive it.

Each test gives a 0.3 s limit and asserts the call ends with LuaTimeoutError
well before the 10 s "it hung" bound; the exact overshoot is not the point.
"""

from __future__ import annotations

import threading
import time

import pytest

from isobranch import LuaMemoryError, LuaRuntime, LuaTimeoutError

LIMIT = 0.3
HANG = 10.0

ESCAPES = {
    "plain loop": "while true do end",
    "repeat": "repeat until false",
    "numeric for": "for i = 1, math.huge do end",
    "tail recursion": "local function f() return f() end return f()",
    "pcall swallowing": "while true do pcall(function() while true do end end) end",
    "nested pcall": "while true do pcall(pcall, pcall, function() while true do end end) end",
    "xpcall looping handler":
        "while true do xpcall(function() while true do end end, "
        "function() while true do end end) end",
    "xpcall erroring handler":
        "while true do xpcall(function() while true do end end, function(e) error(e) end) end",
    "error with looping __tostring":
        "while true do pcall(error, setmetatable({}, {__tostring = function() "
        "while true do end end})) end",
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
    "__close handler": "local x <close> = setmetatable({}, {__close = function() "
                       "while true do end end})",
    "__index recursion": "local t = setmetatable({}, {__index = function(t, k) "
                         "while true do end end}) return t.x",
    "__eq loop": "local mt = {__eq = function() while true do end end} "
                 "return setmetatable({}, mt) == setmetatable({}, mt)",
    "__concat loop": "return setmetatable({}, {__concat = function() while true do end end}) .. 'x'",
    "__len loop": "return #setmetatable({}, {__len = function() while true do end end})",
    "gsub callback": "string.gsub(string.rep('a', 10), 'a', function() while true do end end)",
    "sort comparator": "table.sort({3, 1, 2, 5, 4}, function(a, b) while true do end end)",
    "load reader": "while true do load(function() while true do end end) end",
    "loaded chunk": "load('while true do end')()",
    "string.rep churn": "while true do local s = string.rep('x', 1e5) end",
    "table growth churn": "while true do local t = {} for i = 1, 1000 do t[i] = i end end",
    "tostring in loop": "while true do tostring({}) end",
}


@pytest.mark.parametrize("code", ESCAPES.values(), ids=ESCAPES.keys())
def test_no_lua_program_outlives_its_timeout(code):
    runtime = LuaRuntime(timeout=LIMIT)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError, match="timeout"):
        runtime.execute(code)
    assert time.monotonic() - start < HANG
    # The VM was discarded; the runtime works again.
    assert runtime.execute("return 40 + 2") == 42


def test_timeout_in_node_code_and_conditions():
    runtime = LuaRuntime(timeout=LIMIT)
    with pytest.raises(LuaTimeoutError):
        runtime.execute_node_code("while true do end", {"x": 1})
    with pytest.raises(LuaTimeoutError):
        runtime.eval_condition("(function() while true do end end)()", {})


def test_huge_return_value_is_bounded_by_the_timeout_or_memory():
    runtime = LuaRuntime(timeout=LIMIT, max_memory=64 * 2**20)
    start = time.monotonic()
    with pytest.raises((LuaTimeoutError, LuaMemoryError)):
        runtime.execute("local t = {} for i = 1, 1e9 do t[i] = {i} end return t")
    assert time.monotonic() - start < HANG


def test_per_call_timeout_overrides_the_default():
    runtime = LuaRuntime(timeout=60)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("while true do end", timeout=0.2)
    assert time.monotonic() - start < HANG


def test_should_stop_cancels_a_running_call():
    stop = threading.Event()
    runtime = LuaRuntime(timeout=None, should_stop=stop.is_set)
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError, match="stopped"):
        runtime.execute("while true do end")
    assert time.monotonic() - start < HANG


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
        thread.join(HANG)
    assert outcome == {"spin": "timeout", "work": 2_000_001_000_000}


def test_no_timeout_means_no_hook():
    runtime = LuaRuntime(timeout=None)
    assert runtime.execute("local s = 0 for i = 1, 1e6 do s = s + 1 end return s") == 1_000_000
