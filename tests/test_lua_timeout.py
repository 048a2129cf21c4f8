"""The Lua time limit is unconditional: adversarial programs that try to outlive it.

Each test gives a short limit and asserts the call ends with LuaTimeoutError
before limit + MARGIN: this checks "does not hang", not speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import frames_of, wait_until
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


@pytest.mark.parametrize("fill", ["t[i] = {s, i, i + 0.5}", "t[i] = i", "t[s .. i] = i"],
                         ids=["nested", "flat-list", "flat-dict"])
def test_encoding_a_result_made_of_one_table_many_times_stops_at_the_timeout(fill):
    """Building a 20k-item table takes milliseconds; the result holds it 400
    times, ~8M values to encode (seconds): the encoder itself must look at
    the clock, within one flat list or dict as well as between nested tables."""
    runtime = LuaRuntime(timeout=0.2, max_memory=None)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute(f"local s = string.rep('x', 10) local t = {{}} for i = 1, 2e4 do {fill} end "
                        "local r = {} for i = 1, 400 do r[i] = t end return r")
    assert time.monotonic() - start < 0.2 + MARGIN


def test_per_call_timeout_overrides_the_default():
    runtime = LuaRuntime(timeout=60)
    start = time.monotonic()
    with pytest.raises(LuaTimeoutError):
        runtime.execute("while true do end", timeout=0.2)
    assert time.monotonic() - start < 0.2 + MARGIN


def test_should_stop_cancels_a_running_call():
    stop = threading.Event()
    runtime = LuaRuntime(timeout=None, should_stop=stop.is_set)
    caller = threading.get_ident()
    clock = time.pthread_getcpuclockid(caller)
    stopped_at: list[float] = []

    def stop_once_the_loop_spins() -> None:  # set during the call, not before it
        begin = time.clock_gettime(clock)
        if wait_until(lambda: "execute" in frames_of(caller)
                      and time.clock_gettime(clock) - begin >= 0.05, 30):
            stopped_at.append(time.monotonic())
            stop.set()

    stopper = threading.Thread(target=stop_once_the_loop_spins)
    stopper.start()
    try:
        with pytest.raises(LuaTimeoutError, match="stopped"):
            runtime.execute("while true do end")
    finally:
        stop.set()
        stopper.join(30)
    assert stopped_at and time.monotonic() - stopped_at[0] < MARGIN


def test_a_call_asks_python_at_its_first_hook_firing_and_never_before():
    # A call too short to fire the hook costs no clock reading and no
    # Python call; the first firing asks at once, not a CPU slice later, so
    # reading no clock when a call starts delays no deadline.
    polls = []
    runtime = LuaRuntime(timeout=None, should_stop=lambda: polls.append(1) and False)
    assert runtime.execute("return 1") == 1
    assert polls == []
    # A few thousand instructions: a handful of firings, far less than a slice.
    assert runtime.execute("local s = 0 for i = 1, 500 do s = s + i end return s") == 125250
    assert len(polls) == 1


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
    # Without a hook a limit is not enforced by the runtime itself (a process
    # backend kills the worker instead): a loop that outlasts it completes.
    # The hooked runtime beside it shows that the loop does outlast the limit.
    loop = "local s = 0 for i = 1, 3e7 do s = s + 1 end return s"
    with LuaRuntime(timeout=0.001) as hooked, pytest.raises(LuaTimeoutError):
        hooked.execute(loop)
    with LuaRuntime(timeout=0.001, timeout_hook=False) as unhooked:
        assert unhooked.execute(loop) == 30_000_000


def test_memory_error_discards_the_vm_and_the_runtime_recovers():
    runtime = LuaRuntime(timeout=5, max_memory=16 * 2**20)
    runtime.execute("kept = 1")
    with pytest.raises(LuaMemoryError):
        runtime.execute("local t = {} for i = 1, 1e8 do t[i] = string.rep('x', 64) .. i end")
    assert runtime.execute("return kept") is None
    assert runtime.execute("return 1 + 1") == 2


# -- the coroutine/pcall family -------------------------------------------------
# Each program catches the timeout over and over, in threads that had not yet
# seen it. FAMILY_LIMIT and FAMILY_BOUND are a correctness bound ("it ends"),
# not a speed claim.
FAMILY_LIMIT = 0.3
FAMILY_BOUND = 1.5
SPIN = "local function spin() while true do pcall(function() while true do end end) end end "
FAMILY = {
    "pcall loops in fresh coroutines (the reported program)":
        SPIN + "while true do local co = coroutine.create(function() pcall(spin) end) "
               "coroutine.resume(co) end",
    "pcall loops in fresh wrapped coroutines":
        SPIN + "while true do pcall(coroutine.wrap(function() pcall(spin) end)) end",
    "xpcall loops in fresh coroutines":
        SPIN + "while true do coroutine.resume(coroutine.create(function() "
               "xpcall(spin, function(e) return e end) end)) end",
    "fresh coroutines nested in fresh coroutines":
        SPIN + "local function nest(n) if n == 0 then pcall(spin) return end "
               "coroutine.resume(coroutine.create(function() pcall(nest, n - 1) end)) end "
               "while true do pcall(nest, 5) end",
    "a fresh coroutine per caught error":
        "while true do local ok = pcall(function() while true do end end) "
        "coroutine.resume(coroutine.create(function() while true do pcall(error) end end)) end",
    "message handler that loops in a fresh coroutine":
        "while true do coroutine.resume(coroutine.create(function() xpcall(function() "
        "while true do end end, function() while true do pcall(error) end end) end)) end",
    "message handler that retries the body through a load reader":
        # Found by the generator: the reader's error makes load call the handler
        # while the body runs inside it; at the C stack limit the hook itself fails.
        "local h h = function(e) return xpcall(function() while true do "
        "load(function() error('boom') end) end end, h) end while true do pcall(h) end",
    "every hook fires at the C stack limit":
        # Found while studying the above: the hook call fails ("C stack
        # overflow") before it can check the clock, every time.
        "local mt = {} local t = setmetatable({}, mt) local spinning = false "
        "mt.__index = function(_, k) if k > 0 then return t[k - 1] end "
        "  if spinning then while true do end end return 1 end "
        "local depth = 0 while pcall(function() return t[depth + 1] end) do depth = depth + 1 end "
        "spinning = true while true do pcall(function() return t[depth] end) end",
    "protected calls piled up across yields":
        # Found by the generator (long run): yielding inside a pcall frees the
        # C stack, so the nesting had no limit, and once time was up each
        # level's catch walked the whole call stack: minutes of unwinding.
        "local co = coroutine.wrap(function() "
        "  local function f() coroutine.yield() pcall(f) while true do end end pcall(f) end) "
        "for _ = 1, 200000 do co() end while true do end",
    "message handlers piled up across yields":
        "local co = coroutine.wrap(function() local function body() coroutine.yield() "
        "  error(setmetatable({}, {__tostring = function() while true do end end})) end "
        "  local h h = function(e) return xpcall(body, h) end "
        "  while true do xpcall(body, h) end end) "
        "while true do co() end",
    "coroutine closed after dying at the C stack limit":
        # Its hook failed where the coroutine died, so hooks stayed off on it.
        "local mt = {} local t = setmetatable({}, mt) local spinning = false "
        "mt.__index = function(_, k) if k > 0 then return t[k - 1] end "
        "  if spinning then while true do end end return 1 end "
        "local function probe(d) "
        "  return (coroutine.resume(coroutine.create(function() return t[d] end))) end "
        "local depth = 0 while probe(depth + 1) do depth = depth + 1 end "
        "spinning = true "
        "while true do local co = coroutine.create(function() "
        "  local x <close> = setmetatable({}, {__close = function() while true do end end}) "
        "  return t[depth] end) coroutine.resume(co) pcall(coroutine.close, co) end",
}


# A program that escapes would hang whatever runs it (no hook can stop it and a
# thread cannot be killed), so these run in a child process that is killed
# after CHILD_LIMIT: an escape fails the test instead of hanging the suite.
CHILD_LIMIT = 30
ROOT = Path(__file__).resolve().parent.parent
RUNTIME_CHILD = """
import json, sys, time
from isobranch import LuaRuntime, LuaTimeoutError
runtime = LuaRuntime(timeout=float(sys.argv[2]))
start = time.monotonic()
try:
    runtime.execute(sys.argv[1])
    outcome = "returned"
except LuaTimeoutError:
    outcome = "timeout"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
elapsed = time.monotonic() - start
print(json.dumps({"outcome": outcome, "elapsed": elapsed, "again": runtime.execute("return 1 + 1")}))
"""
BRANCH_CHILD = """
import json, os, sys, threading, time
sys.path.insert(0, "tests")
from conftest import fan_out
from isobranch.nodes import LuaNode
code, limit, sibling_code = sys.argv[1], float(sys.argv[2]), sys.argv[3]
graph = fan_out(("spin", LuaNode("spin", code)), ("sibling", LuaNode("sibling", sibling_code)))
# branch_timeout: should the Lua program escape, the invocation still returns
# (its branch abandoned, still spinning on its thread), so the checks below
# report it rather than a hang.
with graph.compile(isolation="thread", lua_timeout=limit, max_workers=2,
                   branch_timeout=float(sys.argv[4])) as compiled:
    start = time.monotonic()
    spin, sibling = compiled.invoke({})["results"]
    elapsed = time.monotonic() - start
    # The pool threads (the one that ran the timed-out branch among them):
    # their CPU clocks over a window after the fan-in (the window is what is
    # measured, not a wait).
    clocks = [time.pthread_getcpuclockid(t.ident) for t in threading.enumerate()
              if t.name.startswith("isobranch-branch")]
    before = sum(time.clock_gettime(clock) for clock in clocks)
    time.sleep(0.3)
    idle_cpu = sum(time.clock_gettime(clock) for clock in clocks) - before
    ran_on_pool = spin.worker is not None and spin.worker.startswith("isobranch-branch")
    stopped = spin.error_type == "LuaTimeoutError"
    again = compiled.invoke({})["results"][1].state if stopped else None
print(json.dumps({"elapsed": elapsed, "spin_error_type": spin.error_type, "spin_node": spin.node,
                  "spin_error": spin.error, "sibling_success": sibling.success,
                  "sibling_state": sibling.state, "idle_cpu": idle_cpu, "again": again,
                  "ran_on_pool": ran_on_pool}))
sys.stdout.flush()
os._exit(0)  # an escaped program would keep its pool thread, and the exit, busy
"""


def _in_child(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (killed after CHILD_LIMIT); its JSON output."""
    try:
        done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=CHILD_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the Lua program did not end within {CHILD_LIMIT}s (child killed):\n"
                    f"{args[0]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _runtime_outcome(code: str, limit: float) -> dict:
    return _in_child(RUNTIME_CHILD, code, str(limit))


@pytest.mark.parametrize("code", FAMILY.values(), ids=FAMILY.keys())
def test_the_pcall_in_coroutine_family_ends_at_the_timeout(code):
    outcome = _runtime_outcome(code, FAMILY_LIMIT)
    assert outcome["outcome"] == "timeout"
    assert outcome["elapsed"] < FAMILY_BOUND
    assert outcome["again"] == 2  # the same LuaRuntime works after the timeout


@pytest.mark.parametrize("code", FAMILY.values(), ids=FAMILY.keys())
def test_the_pcall_in_coroutine_family_ends_in_a_thread_branch(code):
    outcome = _in_child(BRANCH_CHILD, code, str(FAMILY_LIMIT), SUM_BODY, str(2 * FAMILY_BOUND))
    assert outcome["elapsed"] < FAMILY_BOUND
    assert outcome["spin_error_type"] == "LuaTimeoutError", outcome["spin_error"]
    assert outcome["spin_node"] == "spin" and "'spin'" in outcome["spin_error"]
    assert outcome["sibling_success"] and outcome["sibling_state"]["sum"] == SUM_RESULT


SUM_BODY = "local s = 0 for i = 1, 1e5 do s = s + i end return {sum = s}"
SUM_RESULT = 5_000_050_000

# Each pooled coroutine has not run since time was up, so each would get a
# whole hook interval of costly instructions (tens of milliseconds) of its own.
POOLED_AFTER_TIME_IS_UP = """
local pool = {}
local function body()
  for _ = 1, 2 do local c = table.remove(pool) if c then coroutine.resume(c) end end
  while true do local _ = string.rep("x", 100000) end
end
for i = 1, 200 do pool[i] = coroutine.create(body) end
coroutine.resume(coroutine.create(function() while true do end end))
coroutine.resume(table.remove(pool))
"""


def test_coroutines_made_before_the_timeout_cannot_run_after_it():
    outcome = _runtime_outcome(POOLED_AFTER_TIME_IS_UP, FAMILY_LIMIT)
    assert outcome["outcome"] == "timeout"
    assert outcome["elapsed"] < FAMILY_BOUND


def test_xpcall_handler_semantics_are_kept():
    runtime = LuaRuntime(timeout=5)
    # The handler's value is xpcall's second result (only the first value).
    assert runtime.execute("return {xpcall(error, function(e) return e .. '!', 2 end, 'x')}") \
        == [False, "x!"]
    # A handler that raises is called again with its own error...
    assert runtime.execute("local n = 0 local ok, e = xpcall(error, function(e) n = n + 1 "
                           "if n < 3 then error('again', 0) end return e end) return {ok, e, n}") \
        == [False, "again", 3]
    # ... until Lua gives up.
    assert runtime.execute("return {xpcall(error, function(e) error(e) end)}") \
        == [False, "error in error handling"]
    assert runtime.execute("return {xpcall(function(a, b) return a + b end, print, 1, 2)}") \
        == [True, 3]
    with pytest.raises(LuaRuntimeError, match="bad argument #2 to 'xpcall'"):
        runtime.execute("xpcall(print)")


def test_protected_calls_nest_200_deep_in_a_coroutine_that_yields():
    runtime = LuaRuntime(timeout=5)
    # Outside coroutines Lua's C stack stops nesting first, as it always did.
    assert runtime.execute("local n = 0 local function f() n = n + 1 pcall(f) end f() "
                           "return n") < 200
    message = runtime.execute(
        "local co = coroutine.wrap(function() local n = 0 local function f() n = n + 1 "
        "coroutine.yield() local ok, e = pcall(f) if not ok then coroutine.yield(e) end end "
        "f() end) for i = 1, 300 do local r = co() if r then return r end end")
    assert "too many nested protected calls" in message and "allows 200" in message


def test_coroutine_semantics_are_kept():
    runtime = LuaRuntime(timeout=5)
    assert runtime.execute(
        "local co = coroutine.create(function(a) local b = coroutine.yield(a + 1) "
        "error({code = b}) end) "
        "local _, first = coroutine.resume(co, 1) local ok, err = coroutine.resume(co, 7) "
        "return {first, ok, err.code, coroutine.status(co), (coroutine.close(co))}") \
        == [2, False, 7, "dead", False]
    assert runtime.execute("local w = coroutine.wrap(function(...) coroutine.yield(...) "
                           "return 'done' end) return {w(1, 2), w()}") == [1, "done"]
    with pytest.raises(LuaRuntimeError, match="bad argument #1 to 'create'"):
        runtime.execute("coroutine.create(1)")
    with pytest.raises(LuaRuntimeError, match="boom"):
        runtime.execute("coroutine.wrap(function() error('boom') end)()")


def test_a_timed_out_thread_branch_leaves_its_pool_thread_idle():
    outcome = _in_child(BRANCH_CHILD, FAMILY["pcall loops in fresh coroutines (the reported program)"],
                        str(FAMILY_LIMIT), SUM_BODY, str(2 * FAMILY_BOUND))
    # A Lua program still running on a pool thread would use the whole 0.3 s window.
    assert outcome["idle_cpu"] < 0.05, f"pool threads busy after the fan-in: {outcome}"
    assert outcome["spin_error_type"] == "LuaTimeoutError" and outcome["ran_on_pool"]
    # The sibling branch is unaffected, and the pool runs the next invocation.
    assert outcome["sibling_success"] and outcome["sibling_state"]["sum"] == SUM_RESULT
    assert outcome["again"]["sum"] == SUM_RESULT


def test_a_turn_from_cheap_to_costly_instructions_is_seen_within_about_one_interval():
    # The hook reads the CPU clock at every 8th firing, and at every firing
    # after a collector cycle ended: costly instructions allocate, so a
    # program that turns from a cheap loop to a loop of them is still looked
    # at after about one hook interval of them. Stopped by should_stop at a
    # CPU time, so the overrun is counted in CPU time, whatever the load.
    costly = 'local _ = string.rep("x", 100000)'  # 6 VM instructions
    with LuaRuntime(timeout=600) as hooked:
        intervals = []
        for _ in range(3):
            started = time.process_time()
            hooked.execute(f"for _ = 1, {1000 // 6} do {costly} end")
            intervals.append(time.process_time() - started)
    interval = min(intervals)  # the CPU time of one hook interval of them
    program = f"local s = 0 for i = 1, 1e5 do s = s + i end while true do {costly} end"
    overruns = []
    for _ in range(4):
        stop_at = time.process_time() + 0.05
        runtime = LuaRuntime(timeout=None,
                             should_stop=lambda at=stop_at: time.process_time() >= at)
        with pytest.raises(LuaTimeoutError):
            runtime.execute(program)
        overruns.append(time.process_time() - stop_at)
    # One interval, and a little; reading the clock only every 8th firing
    # overruns by anything up to 8 intervals.
    assert max(overruns) < 2 * interval + 0.005, (overruns, interval)
