"""The YAML format (docs/yaml.md) and its error reporting."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from isobranch import GraphError, GraphExecutionError, YAMLEngine
from isobranch.sizes import parse_size

# start -> lua_stats | python_stats -> combine -> big (Python condition) / small (Lua condition)
DEMO = (Path(__file__).parent / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8")


def test_design_example_runs(load):
    assert load(DEMO).invoke({"items": [4, 8]}) == {
        "items": [4, 8], "stats": {"total": 12, "count": 2, "largest": 8}, "verdict": "big: total 12"}


def test_lua_condition_routes(load):
    document = yaml.safe_load(DEMO)
    document["edges"][5]["when"] = "False"
    document["edges"][6]["when"] = {"lua": "state.stats.largest == state.stats.count"}
    assert load(document).invoke({"items": [2, 1]})["verdict"] == "small: total 3"
    with pytest.raises(GraphExecutionError, match="node 'combine': no outgoing edge condition held"):
        load(document).invoke({"items": [5, 1]})


def test_yaml_conditions_none_of_which_holds_fail_naming_the_node(load):
    document = yaml.safe_load(DEMO)
    # Neither condition holds and combine has no unconditional edge.
    document["edges"][5]["when"] = "False"
    document["edges"][6]["when"] = {"lua": "false"}
    with pytest.raises(GraphExecutionError, match="node 'combine': no outgoing edge condition held"
                       ) as info:
        load(document).invoke({})
    assert info.value.node == "combine" and info.value.branch is None


def test_settings_are_applied():
    graph = YAMLEngine().load_from_dict(yaml.safe_load(DEMO))
    with graph:
        assert (graph.isolation, graph.max_workers, graph.branch_timeout, graph.fail_fast) == (
            "thread", 4, 10, True)
        assert graph.lua_timeout == 5 and graph.lua_max_memory == 64 * 2**20
        assert graph.variables == {"threshold": 10}


@pytest.mark.parametrize(("engine_args", "settings", "expected"), [
    ({}, {}, "thread"),
    ({}, {"isolation": "inline"}, "inline"),
    ({}, {"strategy": "inline"}, "inline"),
    ({"isolation": "thread"}, {"isolation": "inline"}, "thread"),
])
def test_isolation_precedence(engine_args, settings, expected):
    document = {"settings": {"parallel": settings}, "nodes": [{"name": "a", "run": "pass"}]}
    with YAMLEngine(**engine_args).load_from_dict(document) as graph:
        assert graph.isolation == expected


def test_engine_options_override_yaml_settings():
    document = {"settings": {"parallel": {"branch_timeout": 5, "fail_fast": False}},
                "nodes": [{"name": "a", "run": "pass"}]}
    with YAMLEngine(branch_timeout=1.5, fail_fast=True).load_from_dict(document) as graph:
        assert graph.branch_timeout == 1.5 and graph.fail_fast is True


def test_lua_timeout_precedence():
    document = {"settings": {"lua": {"timeout": 2}}, "nodes": [{"name": "a", "run": "pass"}]}
    with YAMLEngine().load_from_dict(document) as graph:
        assert graph.lua_timeout == 2
    with YAMLEngine(lua_timeout=7).load_from_dict(document) as graph:
        assert graph.lua_timeout == 7


def test_nodes_chain_in_list_order_without_edges(load):
    graph = load({"nodes": [
        {"name": "one", "run": "return {'trail': ['one']}"},
        {"name": "two", "run": "-- lua\nreturn {trail = {state.trail[1], 'two'}}"},
        {"name": "three", "run": "return {'trail': state['trail'] + ['three']}"},
    ]})
    assert graph.invoke({}) == {"trail": ["one", "two", "three"]}


def test_variables_are_visible_to_python_lua_and_conditions(load):
    graph = load("""
    variables: {factor: 3, label: x}
    nodes:
      - {name: py, run: "return {'a': variables['factor'] * 2}"}
      - {name: lua, run: "-- lua\\nreturn {b = variables.factor * state.a, c = variables.label}"}
      - {name: accept, run: "return {'went': 'yes'}"}
    edges:
      - {from: __start__, to: py}
      - {from: py, to: lua}
      - {from: lua, to: accept, when: {lua: "state.b == variables.factor * 6"}}
    """)
    assert graph.invoke({}) == {"a": 6, "b": 18, "c": "x", "went": "yes"}


def test_python_node_globals_do_not_leak_between_branches(load):
    graph = load("""
    nodes:
      - {name: start, run: "return {}"}
      - name: a
        run: |
          global leaked
          leaked = "a"
          return {"set": True}
      - name: b
        run: |
          return {"seen": "leaked" in globals()}
      - {name: join, fan_in: true, run: "return {'seen': parallel_results[1].state['seen']}"}
    edges:
      - {from: start, to: a, type: parallel, fan_in: join}
      - {from: start, to: b, type: parallel, fan_in: join}
    """, max_workers=1)
    assert graph.invoke({})["seen"] is False


def test_lua_fan_in_sees_parallel_results(load):
    graph = load("""
    nodes:
      - {name: start, run: "return {}"}
      - {name: a, run: "return {'v': 1}"}
      - {name: b, run: "raise RuntimeError('nope')"}
      - name: join
        fan_in: true
        run: |
          -- lua
          local names, ok = {}, {}
          for i, r in ipairs(state.parallel_results) do
            names[i] = r.branch
            ok[i] = r.success
          end
          return {names = names, ok = ok, v = state.parallel_results[1].state.v,
                  err = state.parallel_results[2].error}
    edges:
      - {from: start, to: a, type: parallel, fan_in: join}
      - {from: start, to: b, type: parallel, fan_in: join}
    """)
    final = graph.invoke({})
    assert final["names"] == ["a", "b"] and final["ok"] == [True, False] and final["v"] == 1
    assert "RuntimeError: nope" in final["err"]
    assert "parallel_results" not in final


def test_load_from_file_resolves_node_files_next_to_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "score.lua").write_text("return {score = #state.items * 10}\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text(textwrap.dedent("""
        nodes:
          - {name: score, language: lua, file: lib/score.lua}
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with YAMLEngine().load_from_file(flow) as graph:
        assert graph.invoke({"items": [1, 2]}) == {"items": [1, 2], "score": 20}


def test_relative_node_file_without_a_base_directory_is_an_error():
    with pytest.raises(GraphError, match="relative file"):
        YAMLEngine().load_from_dict({"nodes": [{"name": "a", "file": "x.lua"}]})


@pytest.mark.parametrize(("document", "fragment"), [
    ({"nodes": []}, "nodes: must be a non-empty list"),
    ({"nodes": [{"run": "pass"}]}, "nodes[0]: missing 'name'"),
    ({"nodes": [{"name": "a"}]}, "node 'a': missing 'run'"),
    ({"nodes": [{"name": "a", "run": "return {"}]}, "node 'a': invalid Python"),
    ({"nodes": [{"name": "a", "run": "x", "language": "rust"}]}, "language must be"),
    ({"nodes": [{"name": "a", "run": "pass"}, {"name": "a", "run": "pass"}]}, "defined twice"),
    ({"nodes": [{"name": "a", "run": "pass"}], "edges": [{"from": "a", "to": "ghost"}]},
     "edges[0] (a -> ghost): unknown node 'ghost' in 'to'"),
    ({"nodes": [{"name": "a", "run": "pass"}, {"name": "b", "run": "pass"}],
      "edges": [{"from": "a", "to": "b", "type": "parallel"}]}, "needs 'fan_in'"),
    ({"nodes": [{"name": "a", "run": "pass"}, {"name": "b", "run": "pass"}],
      "edges": [{"from": "a", "to": "b", "type": "parallel", "fan_in": "join"}]},
     "fan-in node 'join' does not exist"),
    ({"nodes": [{"name": "a", "run": "pass"}, {"name": "b", "run": "pass"},
                {"name": "j", "run": "pass"}, {"name": "k", "run": "pass"}],
      "edges": [{"from": "a", "to": "b", "type": "parallel", "fan_in": "j"},
                {"from": "a", "to": "k", "type": "parallel", "fan_in": "k"}]},
     "a branch cannot start at its own fan-in"),
    ({"nodes": [{"name": "a", "run": "pass"}], "settings": {"parallel": {"isolation": "gpu"}}},
     "unknown isolation backend 'gpu'"),
    ({"nodes": [{"name": "a", "run": "pass"}], "settings": {"lua": {"max_memory": "lots"}}},
     "settings.lua.max_memory"),
    ({"nodes": [{"name": "a", "run": "pass"}], "nodez": []}, "unknown top-level key 'nodez'"),
    ({"nodes": [{"name": "a", "run": "pass"}, {"name": "b", "run": "pass"}],
      "edges": [{"from": "a", "to": "b", "when": "state[)"}]}, "invalid Python condition"),
    ({"nodes": [{"name": "a", "run": "pass"}],
      "settings": {"parallel": {"fresh_worker_per_branch": True}}},
     "fresh_worker_per_branch"),
    ([1, 2], "must be a mapping"),
    ({"nodes": [{"name": True, "run": "pass"}]}, "'name' must be a string, got bool True"),
])
def test_bad_documents_raise_graph_error_naming_the_location(document, fragment):
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_dict(document, source="flow.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("flow.yaml")


def test_lua_nodes_are_rejected_when_lua_is_disabled():
    with pytest.raises(GraphError, match="lua_enabled=False"):
        YAMLEngine(lua_enabled=False).load_from_dict(
            {"nodes": [{"name": "a", "run": "-- lua\nreturn {}"}]})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("nodes:\n  - name: a\n    run: [unclosed\n")
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_file(path)
    assert f"{path}:" in str(info.value) and "invalid YAML" in str(info.value)


def test_missing_file_is_a_graph_error(tmp_path):
    with pytest.raises(GraphError, match="cannot read"):
        YAMLEngine().load_from_file(tmp_path / "nope.yaml")


def test_validate_lists_every_problem():
    problems = YAMLEngine().validate_dict({
        "nodes": [{"name": "a", "run": "return {"}, {"name": "b"}],
        "edges": [{"from": "a", "to": "zzz"}],
    }, source="f.yaml")
    assert len(problems) == 3 and all(p.startswith("f.yaml: ") for p in problems)


def test_python_node_error_names_node_and_line(load):
    graph = load({"nodes": [{"name": "explode", "run": "x = 1\ny = x / 0\nreturn {}"}]})
    with pytest.raises(GraphExecutionError) as info:
        graph.invoke({})
    assert info.value.node == "explode" and "ZeroDivisionError" in str(info.value)
    import traceback

    last = traceback.extract_tb(info.value.__cause__.__traceback__)[-1]
    assert (last.filename, last.lineno, last.line) == ("<node explode>", 2, "y = x / 0")


def test_lua_node_error_keeps_the_line_number(load):
    graph = load({"nodes": [{"name": "lua_bad", "run": "-- lua\nlocal t = nil\nreturn t.x"}]})
    with pytest.raises(GraphExecutionError) as info:
        graph.invoke({})
    assert "lua_bad:3:" in str(info.value) and info.value.error_type == "LuaRuntimeError"


# -- errors at run time point into the YAML file ----------------------------------------------

# A fan-out to a Python and a Lua branch that fail on a line that is not
# their code's first; the fan-in keeps the failed results.
BRANCHES_THAT_FAIL = """\
nodes:
  - name: start
    run: return None
  - name: mean
    run: |
      rows = state["rows"]
      helper = lambda: sum(rows) / len(rows)
      return {"mean": helper()}
  - name: check
    language: lua
    run: |
      -- lua
      local limit = state.limit
      return {ok = limit.high > 1}
  - name: join
    fan_in: true
    run: |
      return {"results": parallel_results}
edges:
  - {from: __start__, to: start}
  - {from: start, to: mean, type: parallel, fan_in: join}
  - {from: start, to: check, type: parallel, fan_in: join}
  - {from: mean, to: join}
  - {from: check, to: join}
"""


def write_agent(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lua_name(path: Path) -> str:
    """How Lua names ``path`` in a message: the whole path if Lua keeps it whole (59 characters)."""
    return str(path) if len(str(path)) <= 59 else path.name


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of ``text`` holding ``fragment`` (exactly one does)."""
    (line,) = [number for number, content in enumerate(text.splitlines(), 1)
               if fragment in content]
    return line


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_errors_in_branches_name_the_yaml_files_line_and_the_line_in_the_code(tmp_path,
                                                                             isolation):
    path = write_agent(tmp_path, BRANCHES_THAT_FAIL)
    with YAMLEngine(isolation=isolation).load_from_file(path) as graph:
        path.unlink()  # a traceback's text comes from the node, where it runs, not the file
        results = {r.branch: r for r in graph.invoke({"rows": []})["results"]}
    python_line = line_of(BRANCHES_THAT_FAIL, "helper = lambda")
    assert results["mean"].error == (
        f"node 'mean' in branch 'mean' failed: ZeroDivisionError: division by zero "
        f"(at {path}:{python_line}, line 2 of its code)")
    # The traceback, made where the branch ran, shows the file's line and its text.
    assert (f'File "{path}", line {python_line}, in <lambda>\n'
            f'    helper = lambda: sum(rows) / len(rows)') in results["mean"].traceback
    lua_line = line_of(BRANCHES_THAT_FAIL, "limit.high")
    assert results["check"].error == (
        f"node 'check' in branch 'check' failed: LuaRuntimeError: {lua_name(path)}:{lua_line}: "
        f"attempt to index a nil value (local 'limit') (line 3 of its code)")


def test_a_relative_path_is_named_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_agent(tmp_path, BRANCHES_THAT_FAIL)
    with YAMLEngine(isolation="inline").load_from_file("agent.yaml") as graph:
        results = {r.branch: r for r in graph.invoke({"rows": []})["results"]}
    assert results["mean"].error.endswith(
        f"(at agent.yaml:{line_of(BRANCHES_THAT_FAIL, 'helper = lambda')}, line 2 of its code)")
    assert f"LuaRuntimeError: agent.yaml:{line_of(BRANCHES_THAT_FAIL, 'limit.high')}: " \
           f"attempt to index" in results["check"].error


def test_a_node_failing_after_its_retries_names_the_line(tmp_path):
    text = textwrap.dedent("""\
        nodes:
          - name: fetch
            retry: {max_attempts: 2, initial_interval: 0.001, jitter: false}
            run: |
              url = state["url"]
              raise ConnectionError(url)
        """)
    path = write_agent(tmp_path, text)
    with YAMLEngine().load_from_file(path) as graph, pytest.raises(GraphExecutionError) as info:
        graph.invoke({"url": "x"})
    assert str(info.value) == (f"node 'fetch' failed on attempt 2 of 2: ConnectionError: x "
                               f"(at {path}:{line_of(text, 'raise')}, line 2 of its code)")


ROUTES_THAT_FAIL = """\
nodes:
  - name: route
    run: return None
  - name: work
    run: return None
  - name: join
    fan_in: true
    run: return None
edges:
  - {from: __start__, to: route}
  - {from: route, to: split, when: "state['score'] > 1"}
  - {from: route, to: __end__, when: {lua: "state.limit.high"}}
  - {from: split, to: work, type: map, over: {python: "state['items']"}, fan_in: join}
  - {from: work, to: join}
"""


def test_conditions_and_map_expressions_name_their_yaml_line(tmp_path):
    text = ROUTES_THAT_FAIL.replace("  - name: work\n", "  - name: split\n    run: return None\n"
                                    "  - name: work\n")
    path = write_agent(tmp_path, text)
    failures = []
    with YAMLEngine().load_from_file(path) as graph:
        for state in ({}, {"score": 0}, {"score": 2}):
            with pytest.raises(GraphExecutionError) as info:
                graph.invoke(state)
            failures.append(str(info.value))
    assert failures == [
        f"node 'route': edge condition failed: KeyError: 'score' "
        f"(at {path}:{line_of(text, 'score')})",
        f"node 'route': edge condition failed: LuaRuntimeError: {lua_name(path)}:"
        f"{line_of(text, 'limit.high')}: attempt to index a nil value (field 'limit')",
        f"node 'split': map over python: state['items'] failed: KeyError: 'items' "
        f"(at {path}:{line_of(text, 'items')})",
    ]


def test_node_files_are_named_with_their_own_lines(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "parse.py").write_text("text = state['text']\nreturn {'n': int(text)}\n")
    (tmp_path / "nodes" / "check.lua").write_text("local n = state.n\nreturn {ok = n.x}\n")
    path = write_agent(tmp_path, "nodes:\n  - {name: parse, file: nodes/parse.py}\n"
                                 "  - {name: check, file: nodes/check.lua}\n")
    with YAMLEngine().load_from_file(path) as graph:
        with pytest.raises(GraphExecutionError) as python_error:
            graph.invoke({"text": "x"})
        with pytest.raises(GraphExecutionError) as lua_error:
            graph.invoke({"text": "1"})
    parse = tmp_path / "nodes" / "parse.py"
    assert str(python_error.value).endswith(f"(at {parse}:2)")
    assert f'File "{parse}", line 2' in python_error.value.traceback
    assert str(lua_error.value) == (f"node 'check' failed: LuaRuntimeError: "
                                    f"{lua_name(tmp_path / 'nodes' / 'check.lua')}:2: attempt to "
                                    f"index a number value (local 'n')")


def test_code_without_file_lines_names_only_the_line_in_the_code(tmp_path):
    # Lines of a quoted value are not the file's; a parsed dict has no file at all.
    text = 'nodes:\n  - name: explode\n    run: "x = 1\\ny = x / 0"\n'
    with YAMLEngine().load_from_file(write_agent(tmp_path, text)) as graph, \
            pytest.raises(GraphExecutionError) as quoted:
        graph.invoke({})
    assert str(quoted.value) == "node 'explode' failed: ZeroDivisionError: division by zero"
    assert 'File "<node explode>", line 2' in quoted.value.traceback
    with YAMLEngine().load_from_dict(yaml.safe_load(BRANCHES_THAT_FAIL),
                                     source="agent.yaml") as graph:
        results = {r.branch: r for r in graph.invoke({"rows": []})["results"]}
    assert results["mean"].error.endswith("division by zero")
    assert results["check"].error.endswith(
        "LuaRuntimeError: check:3: attempt to index a nil value (local 'limit')")


def test_lua_state_that_cannot_be_converted_names_the_key(load):
    graph = load({"nodes": [{"name": "py", "run": "return {'bad': {'inner': {1, 2}}}"},
                            {"name": "lua", "run": "-- lua\nreturn {seen = state.bad ~= nil}"}]})
    with pytest.raises(GraphExecutionError) as info:
        graph.invoke({})
    assert info.value.node == "lua" and "['bad']['inner']" in str(info.value)


@pytest.mark.parametrize(("text", "size"), [
    (1024, 1024), ("64MiB", 64 * 2**20), ("1GB", 10**9), ("512 KiB", 512 * 1024),
    ("2k", 2048), (None, None)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_examples_directory_workflows_validate():
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    files = [f for f in os.listdir(examples) if f.endswith(".yaml")]
    assert files
    for name in files:
        assert YAMLEngine().validate_file(os.path.join(examples, name)) == [], name


def test_readme_yaml_example_runs():
    """The README's workflow runs as described there: big for [4, 8, 15], small for [1]."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", readme, re.DOTALL).group(1)
    with YAMLEngine().load_from_dict(yaml.safe_load(block)) as graph:
        final = graph.invoke({"items": [4, 8, 15]})
    assert final["markers"] == ["lua", "python"] and final["verdict"] == "big: total 27 >= 10"
    with YAMLEngine().load_from_dict(yaml.safe_load(block)) as graph:
        assert graph.invoke({"items": [1]})["verdict"] == "small: total 1 < 10"
