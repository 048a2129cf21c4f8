"""Scenarios PY-002-INT-*, PY-002-E2E-* and PY-002-UNIT-005..006.

Each graph-level scenario runs on every isolation backend (the ``isolation``
fixture); the unit scenarios 001-004 live in test_lua_runtime.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from isobranch import LuaRuntime, StateGraph, YAMLEngine

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent


def test_PY_002_INT_001_parallel_branches_get_fresh_lua_runtime(load):
    graph = load("""
    nodes:
      - name: start
        run: |
          -- lua
          parallel_id = "main"
          return {}
      - name: branch_a
        run: |
          -- lua
          local before = parallel_id
          parallel_id = "A"
          return {before = before, after = parallel_id}
      - name: branch_b
        run: |
          -- lua
          local before = parallel_id
          parallel_id = "B"
          return {before = before, after = parallel_id}
      - name: fan_in
        fan_in: true
        run: |
          return {"seen": {r.branch: [r.state.get("before"), r.state["after"]]
                           for r in parallel_results}}
    edges:
      - {from: __start__, to: start}
      - {from: start, to: branch_a, type: parallel, fan_in: fan_in}
      - {from: start, to: branch_b, type: parallel, fan_in: fan_in}
      - {from: branch_a, to: fan_in}
      - {from: branch_b, to: fan_in}
    """)
    final = graph.invoke({})
    # Neither branch sees the main path's global nor the other's: each VM is new.
    assert final["seen"] == {"branch_a": [None, "A"], "branch_b": [None, "B"]}


def test_PY_002_INT_001_branch_lua_timeout_is_inherited_from_settings(load):
    graph = load("""
    settings: {lua: {timeout: 0.3}}
    nodes:
      - {name: start, run: "return {}"}
      - {name: spin, run: "-- lua\\nwhile true do end"}
      - {name: quick, run: "-- lua\\nreturn {ok = true}"}
      - {name: join, fan_in: true, run: "return {'errors': [r.error_type for r in parallel_results]}"}
    edges:
      - {from: start, to: spin, type: parallel, fan_in: join}
      - {from: start, to: quick, type: parallel, fan_in: join}
    """)
    assert graph.invoke({})["errors"] == ["LuaTimeoutError", None]


PARALLEL_MARKERS = """
nodes:
  - {name: start, run: "return {}"}
  - name: branch_a
    run: |
      -- lua
      parallel_marker = "from_a"
      return {marker = parallel_marker}
  - name: branch_b
    run: |
      -- lua
      parallel_marker = "from_b"
      return {marker = parallel_marker}
  - name: fan_in
    fan_in: true
    run: |
      for result in parallel_results:
          if result.get('branch') == 'branch_a':
              assert result['state']['marker'] == 'from_a'
          elif result.get('branch') == 'branch_b':
              assert result['state']['marker'] == 'from_b'
      return {"markers": [r['state']['marker'] for r in parallel_results]}
edges:
  - {from: __start__, to: start}
  - {from: start, to: branch_a, type: parallel, fan_in: fan_in}
  - {from: start, to: branch_b, type: parallel, fan_in: fan_in}
  - {from: branch_a, to: fan_in}
  - {from: branch_b, to: fan_in}
"""


def test_PY_002_INT_002_parallel_branches_isolated_globals(load):
    graph = load(PARALLEL_MARKERS)
    for _ in range(20):
        assert graph.invoke({})["markers"] == ["from_a", "from_b"]


def test_PY_002_INT_003_parallel_branches_isolated_functions(load):
    graph = load("""
    nodes:
      - {name: start, run: "return {}"}
      - name: define
        run: |
          -- lua
          function calc() return 100 end
          return {value = calc()}
      - name: call
        run: |
          -- lua
          return {value = calc()}
      - name: probe
        run: |
          -- lua
          return {visible = calc ~= nil}
      - name: join
        fan_in: true
        run: |
          return {"outcome": {r.branch: (r.success, r.state.get("value"), r.state.get("visible"),
                                         r.error_type) for r in parallel_results},
                  "call_error": parallel_results[1].error}
    edges:
      - {from: start, to: define, type: parallel, fan_in: join}
      - {from: start, to: call, type: parallel, fan_in: join}
      - {from: start, to: probe, type: parallel, fan_in: join}
    """)
    final = graph.invoke({})
    assert final["outcome"] == {
        "define": (True, 100, None, None),
        "call": (False, None, None, "LuaRuntimeError"),
        "probe": (True, None, False, None),
    }
    # The failure names the node, the branch and keeps Lua's line number.
    assert "'call'" in final["call_error"] and "call:2:" in final["call_error"]


def test_PY_002_INT_004_parallel_branches_receive_independent_state(load):
    graph = load("""
    nodes:
      - {name: start, run: "return {'items': [1, 2, 3], 'nested': {'deep': [{'v': 1}]}}"}
      - name: mutate
        run: |
          state["items"][0] = "changed"
          state["nested"]["deep"][0]["v"] = 2
          return {"mutated": True}
      - name: read
        run: |
          import time
          return {"first": state["items"][0], "deep": state["nested"]["deep"][0]["v"]}
      - name: join
        fan_in: true
        run: |
          return {"read": parallel_results[1].state["first"],
                  "deep": parallel_results[1].state["deep"],
                  "mutated_copy": parallel_results[0].state["items"][0]}
    edges:
      - {from: start, to: mutate, type: parallel, fan_in: join}
      - {from: start, to: read, type: parallel, fan_in: join}
    """)
    final = graph.invoke({})
    assert final["read"] == 1 and final["deep"] == 1
    assert final["mutated_copy"] == "changed"
    # The main path keeps the state as it was before the fan-out.
    assert final["items"] == [1, 2, 3] and final["nested"] == {"deep": [{"v": 1}]}


def test_PY_002_INT_005_sequential_lua_execution_works(load):
    graph = load("""
    nodes:
      - name: node_a
        run: |
          -- lua
          return {a = state.x * 2}
      - name: node_b
        language: lua
        run: return {b = state.a + 1, kinds = {math.type(state.a), math.type(state.f)}}
    """)
    assert graph.invoke({"x": 21, "f": 1.5}) == {
        "x": 21, "f": 1.5, "a": 42, "b": 43, "kinds": ["integer", "float"]}


def test_PY_002_INT_006_no_cross_branch_leakage(load):
    graph = load("""
    nodes:
      - {name: start, run: "return {}"}
      - name: branch_a
        run: |
          -- lua
          leaked_var = "A"
          function leaked_func() return "A" end
          leaked_table = {origin = "A"}
          string.leaked = "A"
          return {set = true}
      - name: branch_b
        run: |
          -- lua
          return {
            var_leaked = leaked_var ~= nil,
            func_leaked = leaked_func ~= nil,
            table_leaked = leaked_table ~= nil,
            library_leaked = string.leaked ~= nil
          }
      - name: fan_in
        fan_in: true
        run: |
          b_result = [r for r in parallel_results if r.branch == 'branch_b'][0]
          assert not b_result['state']['var_leaked']
          assert not b_result['state']['func_leaked']
          assert not b_result['state']['table_leaked']
          assert not b_result['state']['library_leaked']
          return {"b": b_result.state, "a_ok": parallel_results[0].success}
    edges:
      - {from: __start__, to: start}
      - {from: start, to: branch_a, type: parallel, fan_in: fan_in}
      - {from: start, to: branch_b, type: parallel, fan_in: fan_in}
      - {from: branch_a, to: fan_in}
      - {from: branch_b, to: fan_in}
    """, max_workers=1)
    # One worker: branch_b runs on the very thread branch_a just used.
    for _ in range(10):
        final = graph.invoke({})
        assert final["a_ok"]
        assert final["b"] == {"var_leaked": False, "func_leaked": False,
                              "table_leaked": False, "library_leaked": False}


def test_PY_002_INT_007_public_api_unchanged(tmp_path):
    engine = YAMLEngine(lua_enabled=True, lua_timeout=30.0)
    document = {"nodes": [{"name": "only", "run": "-- lua\nreturn {ok = true}"}]}
    with engine.load_from_dict(document) as graph:
        assert graph.lua_timeout == 30.0  # the engine's option reached the graph
        assert graph.invoke({}) == {"ok": True}  # and Lua is enabled
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(document))
    with engine.load_from_file(path) as graph:
        assert graph.invoke({"x": 1}) == {"x": 1, "ok": True}
    built = StateGraph()
    built.add_node("n", lambda state: {"y": state["x"] + 1})
    built.set_entry_point("n")
    built.set_finish_point("n")
    with built.compile() as graph:
        assert graph.invoke({"x": 1}) == {"x": 1, "y": 2}


def test_PY_002_E2E_001_isolation_fixture_gives_identical_results_on_every_backend(isolation):
    expected = json.loads((FIXTURES / "lua_parallel_isolation.expected.json").read_text())
    engine = YAMLEngine(isolation=isolation)
    with engine.load_from_file(FIXTURES / "lua_parallel_isolation.yaml") as graph:
        assert graph.invoke({}) == expected


def test_PY_002_E2E_002_lua_runtime_suite_passes_as_a_whole():
    suite = ROOT / "tests" / "test_lua_runtime.py"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist", "-p", "no:randomly"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    assert " passed" in completed.stdout and " failed" not in completed.stdout


def test_PY_002_UNIT_005_sequential_nodes_reuse_one_runtime_per_invocation(load):
    graph = load("""
    nodes:
      - {name: first, run: "-- lua\\ncounter = (counter or 0) + 1\\nreturn {first = counter}"}
      - {name: second, run: "-- lua\\ncounter = counter + 1\\nreturn {second = counter}"}
    """)
    # Within one invocation the VM is shared; the next invocation starts fresh.
    assert graph.invoke({}) == {"first": 1, "second": 2}
    assert graph.invoke({}) == {"first": 1, "second": 2}


def test_PY_002_UNIT_006_creation_overhead_is_measured_against_bare_lupa(monkeypatch):
    import types

    import lupa.lua54
    from benchmarks import cases

    created = {"bare": 0, "sandboxed": 0}

    def counting(kind: str, runtime_class):
        def create(*args, **kwargs):
            created[kind] += 1
            return runtime_class(*args, **kwargs)
        return create

    monkeypatch.setattr(cases, "lupa", types.SimpleNamespace(lua54=types.SimpleNamespace(
        LuaRuntime=counting("bare", lupa.lua54.LuaRuntime))))
    monkeypatch.setattr(cases, "LuaRuntime", counting("sandboxed", cases.LuaRuntime))
    # Known timings in place of a measurement: 50 creations each, the sandboxed
    # ones taking exactly twice as long, then a little more than twice.
    given = [(1.0, 2.0), (1.0, 2.1)]
    compared = []

    def paired_best(baseline, measured, repeat):
        compared.append((baseline, measured))
        return given.pop(0)

    monkeypatch.setattr(cases, "paired_best", paired_best)
    at_limit, past_it = cases.vm_creation(repeat=200), cases.vm_creation(repeat=200)
    assert at_limit.name.startswith("sandboxed LuaRuntime() creation")
    assert at_limit.target == "<= 2x bare lupa"
    assert (at_limit.baseline_seconds, at_limit.measured_seconds) == pytest.approx((0.02, 0.04))
    assert at_limit.ok and at_limit.ratio == pytest.approx(2.0)
    assert not past_it.ok and past_it.ratio == pytest.approx(2.1)
    # What is compared: bare lupa VMs against sandboxed runtimes, 50 a call.
    baseline, measured = compared[0]
    baseline()
    assert created == {"bare": 50, "sandboxed": 0}
    measured()
    assert created["sandboxed"] == 50
    # A runtime that was created is real: it runs code in its own VM.
    assert LuaRuntime().execute("return 6 * 7") == 42
