"""Load-time validation of YAML workflows: every key, Lua syntax, YAML syntax hints."""

from __future__ import annotations

import os
import re
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from isobranch import GraphError, LuaRuntime, LuaRuntimeError, StateGraph, YAMLEngine
from isobranch.cli import main
from isobranch.lua import syntax
from isobranch.yaml_lines import load_with_code_lines

ONE_NODE = [{"name": "a", "run": "pass"}]


def problems_of(document: dict, **engine_options) -> list[str]:
    with pytest.raises(GraphError) as info:
        YAMLEngine(**engine_options).load_from_dict(document)
    return info.value.problems


def only_problem(document: dict, **engine_options) -> str:
    problems = problems_of(document, **engine_options)
    assert len(problems) == 1, problems
    return problems[0]


# -- every key at every level ---------------------------------------------------


@pytest.mark.parametrize(("settings", "path", "suggestion"), [
    ({"paralel": {"isolation": "process"}}, "settings.paralel", "parallel"),
    ({"foo": 1}, "settings.foo", None),
    ({"lua": {"timeot": 3}}, "settings.lua.timeot", "timeout"),
    ({"parallel": {"isolaton": "process"}}, "settings.parallel.isolaton", "isolation"),
    ({"parallel": {"fail_fsat": True}}, "settings.parallel.fail_fsat", "fail_fast"),
    ({"parallel": {"isolation": "process", "fresh_worker_per_brnch": True}},
     "settings.parallel.fresh_worker_per_brnch", "fresh_worker_per_branch"),
    ({"parallel": {"isolation": "dask", "dask": {"adress": "tcp://x:1"}}},
     "settings.parallel.dask.adress", "address"),
    # a section for a backend that is not the chosen one is checked too
    ({"parallel": {"process": {"start_metod": "spawn"}}},
     "settings.parallel.process.start_metod", "start_method"),
    ({"parallel": {"daks": {"address": "tcp://x:1"}}}, "settings.parallel.daks", "dask"),
])
def test_unknown_setting_is_named_with_its_path_the_allowed_keys_and_a_suggestion(
        settings, path, suggestion):
    problem = only_problem({"settings": settings, "nodes": ONE_NODE})
    assert problem.startswith(f"{path}: unknown key (allowed: ")
    assert "unexpected keyword" not in problem
    if suggestion:
        assert problem.endswith(f"did you mean {suggestion!r}?")
    else:
        assert "did you mean" not in problem


def test_allowed_keys_are_listed():
    problem = only_problem({"settings": {"paralel": {}}, "nodes": ONE_NODE})
    assert "(allowed: cache, checkpoint, lua, parallel)" in problem


def test_an_option_of_another_backend_says_which_backend_has_it():
    problem = only_problem({"settings": {"parallel": {"fresh_worker_per_branch": True}},
                            "nodes": ONE_NODE})
    assert problem.startswith("settings.parallel.fresh_worker_per_branch: not an option of "
                              "isolation backend 'thread' but of 'process'")


def test_unknown_isolation_backend_suggests_the_close_one():
    problem = only_problem({"settings": {"parallel": {"isolation": "proces"}}, "nodes": ONE_NODE})
    assert "unknown isolation backend 'proces'" in problem and "did you mean 'process'?" in problem


def test_node_and_edge_keys_are_checked_with_suggestions():
    problems = problems_of({
        "nodes": [{"name": "a", "run": "pass", "lnguage": "python"}, {"name": "b", "run": "pass"}],
        "edges": [{"from": "a", "to": "b", "wen": "True"}],
    })
    assert problems == [
        "node 'a': unknown key 'lnguage' (allowed: cache, description, fan_in, file, input, "
        "language, name, output, replay, retry, run, subgraph); did you mean 'language'?",
        "edges[0] (a -> b): unknown key 'wen' (allowed: as, fan_in, from, index_as, "
        "max_concurrency, over, retry, to, type, when); did you mean 'when'?",
    ]


def test_top_level_key_suggestion():
    problem = only_problem({"nodes": ONE_NODE, "setings": {}})
    assert problem.startswith("unknown top-level key 'setings'")
    assert problem.endswith("did you mean 'settings'?")


def test_every_settings_problem_is_listed_at_once():
    problems = problems_of({
        "settings": {"paralel": {}, "lua": {"timeot": 1},
                     "parallel": {"isolaton": "x", "dask": {"adress": "y"}}},
        "nodes": ONE_NODE})
    assert sorted(p.split(":")[0] for p in problems) == [
        "settings.lua.timeot", "settings.paralel", "settings.parallel.dask.adress",
        "settings.parallel.isolaton"]


def test_known_settings_still_work():
    document = {"settings": {"parallel": {"isolation": "process", "fresh_worker_per_branch": True,
                                          "dask": {"address": "tcp://example:8786"}}},
                "nodes": ONE_NODE}
    with YAMLEngine().load_from_dict(document) as graph:
        assert graph.isolation == "process"
        assert graph.backend_options == {"fresh_worker_per_branch": True}


def test_the_chosen_backends_section_and_flat_keys_are_merged_flat_winning():
    document = {"settings": {"parallel": {
        "isolation": "process", "start_method": "spawn",
        "process": {"fresh_worker_per_branch": True, "start_method": "forkserver"}}},
        "nodes": ONE_NODE}
    with YAMLEngine().load_from_dict(document) as graph:
        assert graph.backend_options == {"fresh_worker_per_branch": True, "start_method": "spawn"}


def test_a_flat_option_of_the_documents_backend_names_both_when_the_caller_runs_another():
    document = {"settings": {"parallel": {"isolation": "process", "fresh_worker_per_branch": True}},
                "nodes": ONE_NODE}
    assert only_problem(document, isolation="inline") == (
        "settings.parallel.fresh_worker_per_branch: an option of isolation backend 'process', "
        "which settings.parallel.isolation chooses, but the caller runs this graph on 'inline'; "
        "put it under settings.parallel.process to apply it only when 'process' runs")
    # Under the backend's name it survives the caller's choice, unused by inline.
    document["settings"]["parallel"] = {"isolation": "process",
                                        "process": {"fresh_worker_per_branch": True}}
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph:
        assert (graph.isolation, graph.backend_options) == ("inline", {})
    document["settings"]["parallel"]["fresh_worker_per_brnch"] = True
    assert only_problem(document, isolation="inline").endswith(
        "did you mean 'fresh_worker_per_branch'?")


@pytest.mark.parametrize("document_isolation", [None, "thread", "inline"])
def test_flat_options_belong_to_the_backend_the_engine_runs(document_isolation):
    parallel = {"fresh_worker_per_branch": True, "max_workers": 1}
    if document_isolation:
        parallel["isolation"] = document_isolation
    document = {"settings": {"parallel": parallel}, "nodes": [
        {"name": "start", "run": "pass"},
        {"name": "probe", "run": "import os\nreturn {'pid': os.getpid()}"},
        {"name": "join", "fan_in": True,
         "run": "return {'pid': parallel_results[0].state['pid']}"}],
        "edges": [{"from": "start", "to": "probe", "type": "parallel", "fan_in": "join"},
                  {"from": "probe", "to": "join"}]}
    with YAMLEngine(isolation="process").load_from_dict(document) as graph:
        assert (graph.isolation, graph.backend_options) == (
            "process", {"fresh_worker_per_branch": True})
        # One worker at most, yet every branch runs in a new one: the option is applied.
        pids = {graph.invoke({})["pid"] for _ in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids


def test_the_cli_isolation_option_decides_where_flat_options_go(tmp_path, capfd):
    flow = tmp_path / "flow.yaml"
    flow.write_text("settings:\n  parallel: {fresh_worker_per_branch: true}\n"
                    "nodes:\n  - {name: a, run: 'return {\"ok\": 1}'}\n", encoding="utf-8")
    assert main(["run", str(flow), "--isolation", "process"]) == 0
    assert '"ok": 1' in capfd.readouterr().out
    assert main(["run", str(flow)]) == 2
    assert ("settings.parallel.fresh_worker_per_branch: not an option of isolation backend "
            "'thread' but of 'process'") in capfd.readouterr().err


def test_a_config_isolation_uses_that_backends_own_section():
    document = {"settings": {"parallel": {"process": {"start_method": "spawn"}}},
                "nodes": ONE_NODE}
    with YAMLEngine().load_from_dict(document) as graph:
        assert (graph.isolation, graph.backend_options) == ("thread", {})
        assert graph._backend("process", None).start_method == "spawn"
        assert graph._backend("inline", None).name == "inline"
    document["settings"]["parallel"]["process"]["start_method"] = "telepathy"
    with YAMLEngine().load_from_dict(document) as graph, pytest.raises(GraphError) as info:
        graph.invoke({}, config={"isolation": "process"})
    assert str(info.value).startswith("config: isolation backend 'process': start_method must "
                                      "be one of")


def test_map_edge_keys_are_not_unknown_keys():
    problems = problems_of({
        "nodes": [{"name": "a", "run": "pass"}, {"name": "b", "run": "pass"}],
        "edges": [{"from": "a", "to": "b", "type": "mapp", "over": "items", "as": "item",
                   "index_as": "i", "max_concurrency": 2, "retry": {"max_attempts": 2}}],
    })
    assert not any("unknown key" in problem for problem in problems), problems


def test_unknown_compile_keyword_is_a_graph_error_with_a_suggestion():
    graph = StateGraph().add_node("a", lambda state: None).set_entry_point("a")
    with pytest.raises(GraphError) as info:
        graph.compile(fail_fsat=True)
    message = str(info.value)
    assert message.startswith("compile(): unknown keyword 'fail_fsat' for isolation backend "
                              "'thread' (allowed: ")
    assert "fail_fast" in message and message.endswith("did you mean 'fail_fast'?")
    assert "unexpected keyword" not in message


def test_unknown_backend_option_to_compile_names_the_backends_own_options():
    graph = StateGraph().add_node("a", lambda state: None).set_entry_point("a")
    with pytest.raises(GraphError) as info:
        graph.compile(isolation="process", backend_options={"fresh_worker": True})
    assert "fresh_worker_per_branch" in str(info.value).split("allowed:")[1]
    assert "did you mean 'fresh_worker_per_branch'?" in str(info.value)


def test_unknown_engine_option_fails_at_once():
    with pytest.raises(GraphError) as info:
        YAMLEngine(branch_timeuot=3, fail_fast=True)
    assert str(info.value).startswith("YAMLEngine(): unknown option 'branch_timeuot' (allowed: ")
    assert str(info.value).endswith("did you mean 'branch_timeout'?")


def test_engine_option_of_another_backend_is_named_as_the_engines():
    problem = only_problem({"nodes": ONE_NODE}, fresh_worker_per_branch=True)
    assert problem.startswith("YAMLEngine(fresh_worker_per_branch=...): not an option of "
                              "isolation backend 'thread'")


class _Strict:
    """A third-party backend whose factory declares its options."""

    name = "strict-test"

    def __init__(self, max_workers: int | None = None, *, colour: str = "red") -> None:
        self.colour = colour

    def run_branches(self, tasks):
        return []

    def close(self) -> None:
        pass


def _permissive(max_workers=None, **options):
    backend = _Strict(max_workers)
    backend.name = "permissive-test"
    backend.options = options
    return backend


def test_registered_backends_options_come_from_the_factorys_signature(test_backend):
    test_backend("strict-test", _Strict)
    test_backend("permissive-test", _permissive)
    settings = {"parallel": {"isolation": "strict-test", "colur": "blue"}}
    assert only_problem({"settings": settings, "nodes": ONE_NODE}).endswith(
        "did you mean 'colour'?")
    settings = {"parallel": {"isolation": "permissive-test", "anything": 1}}
    with YAMLEngine().load_from_dict({"settings": settings, "nodes": ONE_NODE}) as graph:
        assert graph.backend_options == {"anything": 1}


# -- Lua syntax at load time ----------------------------------------------------------------


def test_lua_node_syntax_error_is_found_at_load_time():
    problem = only_problem({"nodes": [{"name": "a", "language": "lua", "run": "x = = 1"}]})
    assert problem == "node 'a', line 1: unexpected symbol near '='"


def test_lua_condition_syntax_error_is_found_at_load_time():
    problem = only_problem({
        "nodes": [{"name": "a", "run": "-- lua\nreturn {}"}, {"name": "b", "run": "-- lua"}],
        "edges": [{"from": "a", "to": "b", "when": {"lua": "state.x =="}},
                  {"from": "a", "to": "__end__"}]})
    assert problem.startswith("edges[0] (a -> b): invalid Lua condition, line 1: ")


BROKEN_LUA = [
    "x = = 1",
    "local a = 1\nlocal b = 2\nif a then\n  return {",
    "-- lua\nfor i = 1 do end",
    "return {a = 1,\n\n b = }",
    "local s = 'unfinished\nreturn s",
    "goto nowhere",
    "local x <const> = 1; x = 2",
]


@pytest.mark.parametrize("code", BROKEN_LUA)
def test_load_time_lua_errors_carry_the_run_time_line_and_message(code):
    problem = only_problem({"nodes": [{"name": "n", "language": "lua", "run": code}]})
    with LuaRuntime() as lua, pytest.raises(LuaRuntimeError) as info:
        lua.execute_node_code(code, {}, chunk_name="n")
    line, message = re.match(r"n:(\d+): (.*)", str(info.value)).groups()
    assert problem == f"node 'n', line {line}: {message}"


@pytest.mark.parametrize("expression", ["state.x ==", "(", "state.x = 1 +", "a b c"])
def test_load_time_condition_errors_match_the_runtimes(expression):
    problem = only_problem({
        "nodes": [{"name": "a", "run": "-- lua"}, {"name": "b", "run": "-- lua"}],
        "edges": [{"from": "a", "to": "b", "when": {"lua": expression}},
                  {"from": "a", "to": "__end__"}]})
    with LuaRuntime() as lua, pytest.raises(LuaRuntimeError) as info:
        lua.eval_condition(expression, {}, chunk_name="c")
    line, message = re.match(r"c:(\d+): (.*)", str(info.value)).groups()
    assert problem.endswith(f"invalid Lua condition, line {line}: {message}")


def test_valid_lua_is_checked_but_never_run():
    # Runs would raise or never end; loading only compiles them.
    document = {"nodes": [{"name": "a", "language": "lua", "run": "error('ran at load')"},
                          {"name": "b", "language": "lua", "run": "while true do end"}],
                "edges": [{"from": "a", "to": "b", "when": {"lua": "error('ran')"}},
                          {"from": "a", "to": "__end__"}]}
    with YAMLEngine().load_from_dict(document) as graph:
        assert list(graph.nodes) == ["a", "b"]
    # The same load does check them: one syntax error and it fails, naming the node.
    document["nodes"][1]["run"] = "while true do"
    with pytest.raises(GraphError, match="node 'b'"):
        YAMLEngine().load_from_dict(document)


def test_checker_wraps_node_bodies_as_the_sandbox_does():
    sandbox = (Path(syntax.__file__).parent / "sandbox.lua").read_text()
    assert f'local NODE_PREFIX = "{syntax.NODE_PREFIX}"' in sandbox


def test_lua_file_nodes_are_checked_and_named_by_file(tmp_path):
    (tmp_path / "step.lua").write_text("return {\n  a = 1\n  b = 2\n}\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text("nodes:\n  - {name: step, file: step.lua}\n")
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_file(flow)
    assert info.value.problems == ["node 'step' (file 'step.lua'), line 3: '}' expected "
                                   "(to close '{' at line 1) near 'b'"]


SYNTAX_ERRORS = """\
nodes:
  - name: mean
    run: |
      rows = state["rows"]
      return {
  - name: check
    language: lua
    run: |
      local a = 1
      a = = 2
edges:
  - {from: __start__, to: mean}
  - {from: mean, to: check, when: "state[)"}
  - {from: mean, to: check, when: {lua: "state.x =="}}
"""


def test_syntax_errors_name_the_yaml_files_line_beside_the_codes(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text(SYNTAX_ERRORS, encoding="utf-8")
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_file(flow)
    assert info.value.problems == [
        "node 'mean': invalid Python: '{' was never closed (line 2) (flow.yaml:5)"
        .replace("flow.yaml", str(flow)),
        f"node 'check', line 2: unexpected symbol near '=' ({flow}:10)",
        f"edges[1] (mean -> check): invalid Python condition: closing parenthesis ')' does not "
        f"match opening parenthesis '[' ({flow}:13)",
        f"edges[2] (mean -> check): invalid Lua condition, line 1: syntax error near '==' "
        f"({flow}:14)",
    ]
    # A parsed document has no file lines: the line within the code only.
    assert problems_of(yaml.safe_load(SYNTAX_ERRORS))[:2] == [
        "node 'mean': invalid Python: '{' was never closed (line 2)",
        "node 'check', line 2: unexpected symbol near '='"]


@pytest.mark.parametrize(("text", "expected"), [
    # A literal block starts on the line after its '|'; one line of code is where it is.
    ("nodes:\n  - name: a\n    run: |\n      x = 1\n      y = 2\n  - {name: b, run: pass}\n",
     {("nodes", 0, "run"): 4, ("nodes", 1, "run"): 6}),
    # Blank lines at the start of a block are part of it.
    ("nodes:\n  - name: a\n    run: |\n\n      x = 1\n", {("nodes", 0, "run"): 4}),
    # Conditions and map expressions, plain or under python: / lua:.
    ("edges:\n  - {from: a, to: b, when: \"x\"}\n  - {from: a, to: c, when: {lua: \"y\"}}\n"
     "  - from: a\n    to: d\n    over:\n      python: |\n        z\n",
     {("edges", 0, "when"): 2, ("edges", 1, "when"): 3, ("edges", 2, "over"): 8}),
    # A folded block of several lines, or a quoted value of several lines of code: no line.
    ("nodes:\n  - name: a\n    run: >\n      x = 1\n\n      y = 2\n"
     "  - {name: b, run: \"x = 1\\ny = 2\"}\n  - name: c\n    run: >\n      z = 3\n",
     {("nodes", 2, "run"): 10}),
    # An alias is where its anchor is; a merged key counts; a later duplicate key wins.
    ("nodes:\n  - {name: a, run: &code 'x = 1'}\n  - {name: b, run: *code}\n"
     "  - {<<: {run: 'y = 2'}, name: c}\n  - {name: d, run: 'p = 1', run: [1]}\n",
     {("nodes", 0, "run"): 2, ("nodes", 1, "run"): 2, ("nodes", 2, "run"): 4}),
])
def test_code_lines_are_noted_where_the_code_is_in_the_file(text, expected):
    document, lines = load_with_code_lines(text)
    assert document == yaml.safe_load(text)
    assert lines == expected


def test_lua_checks_from_many_threads_at_once_are_each_right():
    errors: list[str] = []

    def load(index: int) -> None:
        code = "\n" * index + "x = = 1"
        try:
            problem = only_problem({"nodes": [{"name": "n", "language": "lua", "run": code}]})
            if problem != f"node 'n', line {index + 1}: unexpected symbol near '='":
                errors.append(problem)
        except BaseException as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_python_syntax_is_still_checked():
    assert only_problem({"nodes": [{"name": "a", "run": "return {"}]}).startswith(
        "node 'a': invalid Python")


# -- YAML syntax hints ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "where", "line"), [
    ('nodes:\n  - name: a\n    run: return {"a": 1}\n', "3:21", 3),
    ('nodes:\n  - {name: a, run: return {"a": 1}}\n', "2:27", 2),
    ('nodes:\n  - name: a\n    run: x = 1\n      return {"a": x}\n', "4:18", 3),
    ('nodes: [{name: a, run: "-- lua"}, {name: b, run: "-- lua"}]\n'
     'edges:\n  - from: a\n    to: b\n    when: state["a"]: 1\n', "5:21", 5),
])
def test_code_on_one_line_suggests_the_block_form(tmp_path, text, where, line):
    flow = tmp_path / "flow.yaml"
    flow.write_text(text)
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_file(flow)
    message = str(info.value)
    assert message.startswith(f"{flow}:{where}: invalid YAML: ")
    assert f"(line {line}: code in '" in message and ": |' and put the code on the" in message


def test_other_yaml_errors_get_no_code_hint(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text("nodes:\n  - name: a\n    description: a: b\n    run: pass\n")
    with pytest.raises(GraphError) as info:
        YAMLEngine().load_from_file(flow)
    assert str(info.value) == f"{flow}:3:19: invalid YAML: mapping values are not allowed here"


def test_run_read_as_a_yaml_mapping_says_so():
    problem = only_problem({"nodes": [{"name": "a", "run": {"a = 1": None}}]})
    assert problem.startswith("node 'a': 'run' must be code (a string), got a dict")
    assert "run: |" in problem


# -- `isobranch validate` lists everything -----------------------------------------------------

TEN_MISTAKES = """\
descripton: ten mistakes
settings:
  paralel: {isolation: process}
  lua: {timeot: 2}
  parallel: {isolation: thread, isolaton: process}
nodes:
  - {name: start, run: "return {}", lnguage: python}
  - {name: py_broken, run: "return {"}
  - {name: lua_broken, language: lua, run: "x = = 1"}
  - {name: ok, run: "-- lua"}
edges:
  - {from: __start__, to: start}
  - {from: start, to: ok, wen: "True"}
  - {from: ok, to: ghost}
  - {from: ok, to: __end__, when: {lua: "state.x =="}}
  - {from: ok, to: start, type: paralel}
"""


def test_validate_lists_all_ten_mistakes(tmp_path, capfd):
    flow = tmp_path / "flow.yaml"
    flow.write_text(TEN_MISTAKES)
    assert main(["validate", str(flow)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    expected = [
        "unknown top-level key 'descripton'", "settings.paralel: unknown key",
        "settings.lua.timeot: unknown key", "settings.parallel.isolaton: unknown key",
        "node 'start': unknown key 'lnguage'", "node 'py_broken': invalid Python",
        "node 'lua_broken', line 1: unexpected symbol", "unknown key 'wen'",
        "unknown node 'ghost'", "invalid Lua condition, line 1:",
    ]
    assert len(lines) == 11, lines  # the ten, and the unknown edge type
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)
    assert all(line.startswith(f"{flow}: ") for line in lines)


def test_validate_of_a_good_file_is_ok(tmp_path, capfd):
    flow = tmp_path / "flow.yaml"
    flow.write_text(textwrap.dedent("""
        settings: {parallel: {isolation: inline}, lua: {timeout: 2}}
        nodes:
          - {name: a, run: "-- lua\\nreturn {x = 1}"}
    """))
    assert main(["validate", str(flow)]) == 0
    assert capfd.readouterr().out.strip() == f"{flow}: ok"
