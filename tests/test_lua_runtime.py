"""LuaRuntime: unit scenarios PY-002-UNIT-001..004, the three call forms, errors, limits."""

from __future__ import annotations

import threading

import lupa.lua54
import pytest

from isobranch import LuaMemoryError, LuaRuntime, LuaRuntimeError, LuaTimeoutError
from isobranch.defaults import DEFAULT_LUA_MAX_MEMORY
from isobranch.errors import LuaConversionError


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


def test_defaults_and_limits_are_readable():
    runtime = LuaRuntime()
    assert (runtime.timeout, runtime.max_memory) == (30.0, DEFAULT_LUA_MAX_MEMORY)
    assert DEFAULT_LUA_MAX_MEMORY == 512 * 1024 * 1024
    assert (LuaRuntime(timeout=None, max_memory=None).timeout, LuaRuntime(max_memory=None).max_memory
            ) == (None, None)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1}, {"max_memory": 0}])
def test_invalid_limits_are_rejected(kwargs):
    with pytest.raises(ValueError):
        LuaRuntime(**kwargs)


def test_globals_persist_between_calls_on_one_runtime():
    runtime = LuaRuntime()
    runtime.execute("x = 1")
    assert runtime.execute("return x") == 1
    runtime.execute_node_code("y = x + 1", {})
    assert runtime.eval_condition("y == 2", {}) == "true"


def test_close_drops_the_vm_and_the_runtime_is_a_context_manager():
    with LuaRuntime() as runtime:
        runtime.execute("x = 1")
        runtime.close()
        assert runtime.execute("return x") is None
        runtime.execute("x = 2")
    assert runtime.execute("return x") is None


def test_execute_sets_state_as_a_global():
    runtime = LuaRuntime()
    assert runtime.execute("function f() return state.n end return f()", {"n": 1}) == 1
    assert runtime.execute("return f()", {"n": 2}) == 2
    assert runtime.execute("return state") is None


def test_execute_node_code_state_is_a_local_and_returns_updates():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {doubled = state.n * 2}", {"n": 4}) == {"doubled": 8}
    assert runtime.execute("return state") is None, "node state must not become a global"
    assert runtime.execute_node_code("local x = 1", {}) == {}
    assert runtime.execute_node_code("return 7", {}) == {"result": 7}
    assert runtime.execute_node_code("return {1, 2}", {}) == {"result": [1, 2]}
    assert runtime.execute_node_code("return nil") == {}


def test_node_code_can_mutate_its_state_copy_only():
    state = {"items": [1, 2]}
    result = LuaRuntime().execute_node_code(
        "table.insert(state.items, 3) return {items = state.items}", state)
    assert result == {"items": [1, 2, 3]}
    assert state == {"items": [1, 2]}


def test_eval_condition_forms():
    runtime = LuaRuntime()
    assert runtime.eval_condition("state.x > 1", {"x": 2}) == "true"
    assert runtime.eval_condition("return state.x > 1", {"x": 0}) == "false"
    assert runtime.eval_condition("state.label", {"label": "go"}) == "go"
    assert runtime.eval_condition("state.missing", {}) is None
    assert runtime.eval_condition("state.x + 1", {"x": 1}) == "2"
    assert runtime.eval_condition("state.x / 2", {"x": 1}) == "0.5"
    assert runtime.eval_condition("local a = state.x\nif a then return 'yes' end", {"x": 1}) == "yes"
    assert runtime.eval_condition("-- lua\nstate.x == 1", {"x": 1}) == "true"


def test_variables_are_visible_in_all_three_forms():
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return {v = variables.k}", {}, variables={"k": 3}) == {"v": 3}
    assert runtime.execute("return variables.k", {}, variables={"k": "x"}) == "x"
    assert runtime.eval_condition("variables.k > 2", {}, variables={"k": 3}) == "true"
    assert runtime.execute("return variables") is None


def test_errors_keep_the_line_number_and_chunk_name():
    runtime = LuaRuntime()
    with pytest.raises(LuaRuntimeError) as info:
        runtime.execute_node_code("local a = 1\nlocal b = nil\nreturn b.x", {}, chunk_name="my_node")
    assert str(info.value).startswith("my_node:3:")
    with pytest.raises(LuaRuntimeError, match=r"^my_node:2: .*near"):
        runtime.execute("x = 1\nthis is not lua", chunk_name="my_node")
    with pytest.raises(LuaRuntimeError, match=r"^branch_a:1: attempt to index a nil value"):
        runtime.eval_condition("state.a.b", {}, chunk_name="branch_a")
    with pytest.raises(LuaRuntimeError, match=r"^lua:1: boom$"):
        runtime.execute("error('boom')")


def test_errors_never_leak_lupa_types():
    runtime = LuaRuntime()
    for code in ("error('x')", "this is not lua", "error({})", "error()", "return {f = print}"):
        with pytest.raises(LuaRuntimeError) as info:
            runtime.execute(code)
        assert not isinstance(info.value, lupa.lua54.LuaError)
        assert type(info.value).__module__ == "isobranch.errors"


def test_error_values_that_are_not_strings():
    runtime = LuaRuntime()
    with pytest.raises(LuaRuntimeError, match="error object is a table"):
        runtime.execute("error({code = 1})")
    with pytest.raises(LuaRuntimeError, match="error object is a nil"):
        runtime.execute("error()")
    with pytest.raises(LuaRuntimeError, match="error object is a table"):
        runtime.execute("error(setmetatable({}, {__tostring = function() while true do end end}))")


def test_a_runtime_error_keeps_the_vm():
    runtime = LuaRuntime()
    runtime.execute("kept = 1")
    with pytest.raises(LuaRuntimeError):
        runtime.execute("error('x')")
    assert runtime.execute("return kept") == 1


def test_code_must_be_text():
    with pytest.raises(TypeError):
        LuaRuntime().execute(b"return 1")  # type: ignore[arg-type]


def test_memory_limit_raises_and_the_runtime_recovers():
    runtime = LuaRuntime(max_memory=16 * 2**20)
    runtime.execute("kept = 1")
    with pytest.raises(LuaMemoryError) as info:
        runtime.execute("local t = {} for i = 1, 1e8 do t[i] = string.rep('x', 64) .. i end")
    assert not isinstance(info.value, (LuaTimeoutError, LuaConversionError))
    assert runtime.execute("return kept") is None, "the VM is replaced after a limit error"
    assert runtime.execute("return 1 + 1") == 2


def test_memory_limit_applies_to_one_huge_string():
    with pytest.raises(LuaMemoryError):
        LuaRuntime(max_memory=16 * 2**20).execute("return #string.rep('x', 64 * 2^20)")


def test_memory_limit_applies_to_the_input_state():
    runtime = LuaRuntime(max_memory=4 * 2**20)
    with pytest.raises(LuaMemoryError):
        runtime.execute("return #state.big", {"big": ["x" * 100 + str(i) for i in range(100_000)]})
    assert runtime.execute("return 1") == 1


def test_memory_error_caught_inside_lua_is_the_programs_business():
    runtime = LuaRuntime(max_memory=16 * 2**20)
    result = runtime.execute("local ok = pcall(string.rep, 'x', 64 * 1024 * 1024) return ok")
    assert result is False


def test_no_memory_limit():
    runtime = LuaRuntime(max_memory=None)
    assert runtime.execute("return #string.rep('x', 32 * 2^20)") == 32 * 2**20


def test_runtimes_on_threads_do_not_interfere():
    results: dict[int, object] = {}

    def work(index: int) -> None:
        runtime = LuaRuntime()
        runtime.execute(f"mine = {index}")
        total = runtime.execute("local s = 0 for i = 1, 2e5 do s = s + i end return s")
        results[index] = (runtime.execute("return mine"), total)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {i: (i, 20000100000) for i in range(6)}
