"""Untrusted agents: ``YAMLEngine(allow_python=False)`` / ``--lua-only`` runs only sandboxed Lua."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import plain_environment
from isobranch import GraphError, GraphExecutionError, YAMLEngine
from isobranch.cli import main
from isobranch.yaml_builder import assert_lua_only

# From tests/test_lua_timeout.py: a coroutine that catches every error in a loop.
SPIN = ("local co = coroutine.create(function() while true do pcall(function() "
        "while true do end end) end end) while true do coroutine.resume(co) end")

LUA_AGENT = f"""
name: untrusted
settings:
  lua: {{timeout: 0.5, max_memory: 16MiB}}
variables: {{greeting: hi}}
nodes:
  - {{name: start, language: lua, run: "return {{n = 2}}"}}
  - {{name: spin, language: lua, run: "{SPIN}"}}
  - name: calm
    run: |
      -- lua
      return {{calm = variables.greeting .. state.n}}
  - name: join
    fan_in: true
    language: lua
    run: |
      local out = {{}}
      for i, r in ipairs(state.parallel_results) do
        out[i] = {{branch = r.branch, success = r.success, error = r.error or ""}}
      end
      return {{results = out}}
  - {{name: done, language: lua, run: "return {{done = true}}"}}
edges:
  - {{from: __start__, to: start}}
  - {{from: start, to: spin, type: parallel, fan_in: join}}
  - {{from: start, to: calm, type: parallel, fan_in: join}}
  - {{from: join, to: done, when: {{lua: "#state.results == 2"}}}}
  - {{from: join, to: __end__}}
"""


def refusals(document: dict, **engine_options) -> list[str]:
    with pytest.raises(GraphError) as info:
        YAMLEngine(allow_python=False, **engine_options).load_from_dict(document)
    return info.value.problems


def test_lua_only_agent_runs_on_every_backend_and_a_hostile_branch_times_out(load):
    graph = load(LUA_AGENT, allow_python=False)
    final = graph.invoke({})
    spin, calm = final["results"]
    assert spin["branch"] == "spin" and spin["success"] is False
    assert "LuaTimeoutError" in spin["error"] and "0.5s timeout" in spin["error"]
    assert calm == {"branch": "calm", "success": True, "error": ""}
    assert final["done"] is True


def test_hostile_lua_on_the_main_path_ends_with_a_timeout():
    document = {"settings": {"lua": {"timeout": 0.3}},
                "nodes": [{"name": "spin", "language": "lua", "run": SPIN}]}
    with (YAMLEngine(allow_python=False).load_from_dict(document) as graph,
          pytest.raises(GraphExecutionError) as info):
        graph.invoke({})
    assert info.value.node == "spin" and info.value.error_type == "LuaTimeoutError"


def test_every_python_part_is_refused_in_one_error(tmp_path):
    (tmp_path / "step.py").write_text("return {'x': 1}\n")
    (tmp_path / "plain.txt").write_text("return {'x': 1}\n")
    (tmp_path / "ok.lua").write_text("return {x = 1}\n")
    document = yaml.safe_load("""
    nodes:
      - {name: py_node, run: "return {}"}
      - {name: lua_node, language: lua, run: "return {}"}
      - {name: py_file, file: step.py}
      - {name: unmarked_file, file: plain.txt}
      - {name: lua_file, file: ok.lua}
      - {name: py_join, fan_in: true, run: "return {}"}
      - {name: explicit_python, language: python, run: "return {}"}
    edges:
      - {from: __start__, to: lua_node}
      - {from: lua_node, to: lua_file, type: parallel, fan_in: py_join}
      - {from: py_join, to: py_node, when: "True"}
      - {from: py_join, to: py_file, when: {python: "True"}}
      - {from: py_join, to: unmarked_file, when: {lua: "true"}}
      - {from: py_join, to: __end__}
    """)
    with pytest.raises(GraphError) as info:
        YAMLEngine(allow_python=False).load_from_dict(document, base_dir=tmp_path)
    problems = info.value.problems
    assert [problem.split(":")[0] for problem in problems] == [
        "node 'py_node'", "node 'py_file' (file 'step.py')",
        "node 'unmarked_file' (file 'plain.txt')", "node 'py_join'", "node 'explicit_python'",
        "edges[2] (py_join -> py_node)", "edges[3] (py_join -> py_file)",
    ]
    assert all("is Python, which this engine refuses (allow_python=False" in problem
               for problem in problems)
    # The same document is fine for a trusting engine.
    YAMLEngine().load_from_dict(document, base_dir=tmp_path).close()


@pytest.fixture
def agent_dir(tmp_path):
    """An agent directory, and a secret file beside it (outside the directory)."""
    agent = tmp_path / "agent"
    (agent / "lib").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET TOPSECRET\n")
    return agent, secret


def test_files_must_stay_inside_the_agents_directory(agent_dir):
    agent, secret = agent_dir
    os.symlink(secret, agent / "lib" / "escape.lua")
    os.symlink(agent.parent, agent / "up")
    flow = agent / "flow.yaml"
    flow.write_text(yaml.safe_dump({"nodes": [
        {"name": "absolute", "language": "lua", "file": str(secret)},
        {"name": "dotdot", "language": "lua", "file": "../secret.txt"},
        {"name": "hidden_dotdot", "language": "lua", "file": "lib/../../secret.txt"},
        {"name": "symlink", "language": "lua", "file": "lib/escape.lua"},
        {"name": "symlinked_dir", "language": "lua", "file": "up/secret.txt"},
    ]}))
    with pytest.raises(GraphError) as info:
        YAMLEngine(allow_python=False).load_from_file(flow)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "node 'absolute'", "node 'dotdot'", "node 'hidden_dotdot'", "node 'symlink'",
        "node 'symlinked_dir'"]
    assert "must be a path relative to the workflow's directory" in problems[0]
    assert "must not contain '..'" in problems[1] and "must not contain '..'" in problems[2]
    assert "outside the workflow's directory" in problems[3]
    assert "outside the workflow's directory" in problems[4]
    assert not any("TOPSECRET" in problem for problem in problems)
    # A trusting engine reads them (and its syntax error shows the line).
    assert "TOPSECRET" in str(YAMLEngine().validate_file(flow))


def test_files_inside_the_agents_directory_are_read(agent_dir):
    agent, _ = agent_dir
    (agent / "lib" / "step.lua").write_text("return {step = true}\n")
    os.symlink(agent / "lib" / "step.lua", agent / "alias.lua")
    flow = agent / "flow.yaml"
    flow.write_text("nodes:\n  - {name: a, file: lib/step.lua}\n  - {name: b, file: alias.lua}\n")
    with YAMLEngine(allow_python=False).load_from_file(flow) as graph:
        assert graph.invoke({}) == {"step": True}


def test_files_need_a_directory_to_be_confined_to():
    problems = refusals({"nodes": [{"name": "a", "language": "lua", "file": "x.lua"}]})
    assert len(problems) == 1 and "needs load_from_file or base_dir" in problems[0]


def test_a_lua_only_document_may_lower_its_limits_but_not_raise_them():
    problems = refusals({
        "settings": {"lua": {"timeout": 3600, "max_memory": "4GiB"},
                     "parallel": {"max_steps": 10**9}},
        "nodes": [{"name": "a", "run": "-- lua"}]})
    assert [p.split(":")[0] for p in problems] == [
        "settings.lua.timeout", "settings.lua.max_memory", "settings.parallel.max_steps"]
    assert all("a Lua-only document may lower" in p for p in problems)
    assert len(refusals({"settings": {"lua": {"timeout": None, "max_memory": None}},
                         "nodes": [{"name": "a", "run": "-- lua"}]})) == 2
    lower = {"settings": {"lua": {"timeout": 1, "max_memory": "8MiB"},
                          "parallel": {"max_steps": 50}},
             "nodes": [{"name": "a", "run": "-- lua"}]}
    with YAMLEngine(allow_python=False).load_from_dict(lower) as graph:
        assert (graph.lua_timeout, graph.lua_max_memory, graph.max_steps) == (1, 8 * 2**20, 50)
    # What the caller gives is trusted.
    with YAMLEngine(allow_python=False, lua_timeout=100, max_steps=10**6).load_from_dict(
            {"nodes": [{"name": "a", "run": "-- lua"}]}) as graph:
        assert (graph.lua_timeout, graph.max_steps) == (100, 10**6)


def test_a_lua_only_document_cannot_choose_a_dask_scheduler():
    # A scheduler sends back pickled results: choosing one means choosing what runs here.
    problems = refusals({
        "settings": {"parallel": {"isolation": "dask", "dask_address": "tcp://evil:8786",
                                  "dask": {"address": "tcp://evil:8786"}}},
        "nodes": [{"name": "a", "run": "-- lua"}]})
    assert [p.split(":")[0] for p in problems] == ["settings.parallel.dask.address",
                                                   "settings.parallel.dask_address"]
    # Also in the section of a backend the document does not choose: a run's
    # config may choose it (invoke(config={"isolation": "dask"})).
    problems = refusals({"settings": {"parallel": {"dask": {"address": "tcp://evil:8786"}}},
                         "nodes": [{"name": "a", "run": "-- lua"}]})
    assert [p.split(":")[0] for p in problems] == ["settings.parallel.dask.address"]
    assert all("a Lua-only document cannot set this backend option" in p for p in problems)
    with YAMLEngine(allow_python=False, isolation="dask",
                    dask_address="tcp://127.0.0.1:1").load_from_dict(
            {"nodes": [{"name": "a", "run": "-- lua"}]}) as graph:
        assert graph.backend_options == {"dask_address": "tcp://127.0.0.1:1"}


def test_harmless_backend_options_are_allowed():
    document = {"settings": {"parallel": {"isolation": "process",
                                          "fresh_worker_per_branch": True}},
                "nodes": [{"name": "a", "run": "-- lua"}]}
    with YAMLEngine(allow_python=False).load_from_dict(document) as graph:
        assert graph.backend_options == {"fresh_worker_per_branch": True}


def test_the_last_check_catches_python_that_slipped_through():
    graph = YAMLEngine().load_from_dict({"nodes": [{"name": "a", "run": "pass"}]})
    with pytest.raises(GraphError, match="node 'a' of a Lua-only graph has Python parts"):
        assert_lua_only(graph)
    assert graph.closed


def test_cli_lua_only(tmp_path, capfd):
    python_flow = tmp_path / "python.yaml"
    python_flow.write_text("nodes:\n  - {name: a, run: 'return {\"a\": 1}'}\n"
                           "  - {name: b, run: 'return {}'}\n")
    assert main(["validate", str(python_flow)]) == 0
    capfd.readouterr()
    assert main(["validate", "--lua-only", str(python_flow)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("allow_python=False" in line for line in err)
    assert main(["run", "--lua-only", str(python_flow)]) == 2
    assert "node 'a'" in capfd.readouterr().err
    lua_flow = tmp_path / "lua.yaml"
    lua_flow.write_text("nodes:\n  - {name: a, language: lua, run: 'return {a = 1}'}\n")
    assert main(["run", "--lua-only", "--isolation", "inline", str(lua_flow)]) == 0
    assert json.loads(capfd.readouterr().out) == {"a": 1}


def test_unusable_file_paths_are_problems_not_crashes(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    (tmp_path / "folder").mkdir()
    document = {"nodes": [{"name": "loop", "language": "lua", "file": "a"},
                          {"name": "nul", "language": "lua", "file": "x\0y"},
                          {"name": "directory", "language": "lua", "file": "folder"}]}
    for allow_python in (False, True):
        with pytest.raises(GraphError) as info:
            YAMLEngine(allow_python=allow_python).load_from_dict(document, base_dir=tmp_path)
        assert [p.split(":")[0] for p in info.value.problems] == [
            "node 'loop'", "node 'nul'", "node 'directory'"]


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_generated_hostile_programs_as_a_lua_only_agent_all_time_out(tmp_path, isolation):
    """Branches of an untrusted agent built from the hostile-program generator all end at
    their Lua timeout; run by ``isobranch run --lua-only`` in a child process with a hard
    limit, so an escape fails here instead of hanging the suite."""
    import subprocess
    import sys

    from benchmarks.hostile_lua import hostile_program

    seeds = range(1000, 1012)
    document = {
        "name": "untrusted-generated",
        "settings": {"lua": {"timeout": 0.3}, "parallel": {"isolation": isolation}},
        "nodes": [{"name": "start", "language": "lua", "run": "return {}"},
                  *({"name": f"hostile{seed}", "language": "lua",
                     "run": hostile_program(seed)} for seed in seeds),
                  {"name": "join", "fan_in": True, "language": "lua", "run": (
                      "local timeouts = 0\n"
                      "for _, r in ipairs(state.parallel_results) do\n"
                      "  if not r.success and string.find(r.error, 'timeout', 1, true) then\n"
                      "    timeouts = timeouts + 1 end end\n"
                      "return {timeouts = timeouts, branches = #state.parallel_results}")}],
        "edges": [{"from": "__start__", "to": "start"},
                  *({"from": "start", "to": f"hostile{seed}", "type": "parallel",
                     "fan_in": "join"} for seed in seeds),
                  *({"from": f"hostile{seed}", "to": "join"} for seed in seeds)],
    }
    agent = tmp_path / "agent.yaml"
    agent.write_text(yaml.safe_dump(document))
    done = subprocess.run([sys.executable, "-m", "isobranch", "run", "--lua-only", str(agent)],
                          capture_output=True, text=True, timeout=90, check=False,
                          env=plain_environment())
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout)
    assert final["branches"] == len(seeds)
    assert final["timeouts"] == len(seeds), final
