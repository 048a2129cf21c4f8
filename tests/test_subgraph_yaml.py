"""YAML subgraph nodes: ``subgraph: file.yaml`` loaded recursively, its errors named with the
chain of files, include cycles, Lua-only confinement, the command's validate and graph on
the whole tree, and the batch review example.

The engine side (running a subgraph on every backend, names as paths, checkpoints) is
tests/test_subgraph.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch import GraphError, SqliteCheckpointer, YAMLEngine
from isobranch.errors import GraphExecutionError

ROOT = Path(__file__).parent.parent
BATCH_REVIEW = ROOT / "examples" / "batch_review" / "batch.yaml"

# A two-node sub-agent: a Lua node and a Python node, with its own variables and schema.
REVIEW = """\
    name: review
    variables: {bonus: 10}
    state_schema: {doc: str, words: int, score: int, scratch: str}
    nodes:
      - name: count
        language: lua
        run: |
          return {words = #state.doc, scratch = "inner only"}
      - name: score
        run: |
          return {"score": state["words"] + variables["bonus"]}
    """


@pytest.fixture
def files(tmp_path):
    """Write workflow files under tmp_path: ``files({"main.yaml": text, ...})`` → tmp_path."""
    def write(contents: dict[str, str]) -> Path:
        for name, text in contents.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text), encoding="utf-8")
        return tmp_path
    return write


def load(path: Path, **engine_options) -> object:
    return YAMLEngine(isolation="inline", **engine_options).load_from_file(path)


def problems_of(path: Path, **engine_options) -> list[str]:
    return YAMLEngine(**engine_options).validate_file(path)


# -- loading and mappings --------------------------------------------------------------------


def test_a_subgraph_node_runs_its_file_with_its_own_variables_and_maps_state_both_ways(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml, input: {doc: text}, output: {points: score}}
          - name: after
            run: 'return {"seen": sorted(state)}'
        """, "review.yaml": REVIEW})
    with load(root / "main.yaml") as graph:
        final = graph.invoke({"text": "abcd", "other": 1})
    # Only the mapped key came back, renamed; words and scratch stayed inside.
    assert final == {"text": "abcd", "other": 1, "points": 14,
                     "seen": ["other", "points", "text"]}


def test_without_mappings_the_inner_run_sees_the_whole_state_and_returns_its_final_state(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml}
        """, "review.yaml": REVIEW})
    with load(root / "main.yaml") as graph:
        final = graph.invoke({"doc": "abc"})
    assert final == {"doc": "abc", "words": 3, "score": 13, "scratch": "inner only"}


def test_subgraph_paths_are_relative_to_the_file_naming_them_not_the_current_directory(
        files, monkeypatch):
    root = files({
        "agents/main.yaml": """\
            nodes:
              - {name: outer, subgraph: parts/middle.yaml}
            """,
        "agents/parts/middle.yaml": """\
            nodes:
              - {name: middle, subgraph: inner/leaf.yaml}
            """,
        "agents/parts/inner/leaf.yaml": """\
            nodes:
              - {name: leaf, file: leaf.lua}
            """,
        # A file: reference of an inner file is relative to that file too.
        "agents/parts/inner/leaf.lua": "return {leaf = true}\n",
    })
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with load(os.path.relpath(root / "agents" / "main.yaml")) as graph:
        assert graph.invoke({}) == {"leaf": True}
    with load(os.path.relpath(root / "agents" / "main.yaml"), allow_python=False) as graph:
        assert graph.invoke({}) == {"leaf": True}


def test_a_document_given_as_a_mapping_needs_base_dir_for_a_relative_subgraph(files):
    root = files({"review.yaml": REVIEW})
    document = {"nodes": [{"name": "review", "subgraph": "review.yaml"}]}
    [problem] = YAMLEngine().validate_dict(document)
    assert problem == ("node 'review': subgraph 'review.yaml': a relative path needs "
                       "load_from_file or base_dir")
    with YAMLEngine(isolation="inline").load_from_dict(document, base_dir=root) as graph:
        assert graph.invoke({"doc": "ab"})["score"] == 12


def test_an_inner_file_keeps_its_lower_lua_timeout(files):
    root = files({"main.yaml": """\
        settings:
          lua: {timeout: 5}
        nodes:
          - {name: spin, subgraph: spin.yaml}
        """, "spin.yaml": """\
        settings:
          lua: {timeout: 0.2}
        nodes:
          - name: forever
            language: lua
            run: while true do end
        """})
    with load(root / "main.yaml") as graph, pytest.raises(GraphExecutionError) as caught:
        graph.invoke({})
    assert "0.2" in str(caught.value)


def test_an_inner_file_without_lua_settings_inherits_the_including_files_limits(files):
    root = files({"main.yaml": """\
        settings:
          lua: {timeout: 0.2}
        nodes:
          - {name: spin, subgraph: spin.yaml}
        """, "spin.yaml": """\
        nodes:
          - name: forever
            language: lua
            run: while true do end
        """})
    with load(root / "main.yaml") as graph, pytest.raises(GraphExecutionError) as caught:
        graph.invoke({})
    assert "0.2" in str(caught.value)


@pytest.mark.parametrize("setting, value", [("timeout", "30"), ("timeout", "null"),
                                            ("max_memory", "1GiB")])
def test_an_inner_file_raising_a_lua_limit_is_an_error_naming_both_files(files, setting, value):
    root = files({"main.yaml": """\
        settings:
          lua: {timeout: 5, max_memory: 64MiB}
        nodes:
          - {name: review, subgraph: review.yaml}
        """, "review.yaml": f"""\
        settings:
          lua: {{{setting}: {value}}}
        nodes:
          - {{name: a, run: "-- lua"}}
        """})
    [problem] = problems_of(root / "main.yaml")
    assert problem.startswith(f"{root / 'main.yaml'} → {root / 'review.yaml'}: "
                              f"settings.lua.{setting}: a subgraph file may lower")
    assert f"{root / 'main.yaml'} allows" in problem


def test_the_inner_files_parallel_and_checkpoint_settings_are_not_read(files):
    # Values that are errors where they are read: the including run's settings apply.
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml}
        """, "review.yaml": """\
        settings:
          parallel: {isolation: no-such-backend, max_steps: many}
          checkpoint: {pickle: perhaps}
        nodes:
          - name: a
            run: 'return {"a": 1}'
        """})
    with load(root / "main.yaml") as graph:
        assert graph.invoke({}) == {"a": 1}


def test_a_subgraph_node_may_be_a_map_target_with_retry(files):
    root = files({"main.yaml": """\
        nodes:
          - name: start
            run: 'return {"docs": ["a", "bb", "ccc"]}'
          - name: review
            subgraph: review.yaml
            input: {doc: item}
            output: {score: score}
            retry: 2
          - name: join
            fan_in: true
            run: 'return {"scores": [r.state["score"] for r in parallel_results]}'
        edges:
          - {from: __start__, to: start}
          - {from: start, to: review, type: map, over: docs, fan_in: join}
          - {from: review, to: join}
        """, "review.yaml": REVIEW})
    with load(root / "main.yaml") as graph:
        assert graph.invoke({})["scores"] == [11, 12, 13]


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_subgraph_node_may_start_a_parallel_branch_beside_a_plain_node(files, isolation):
    root = files({"main.yaml": """\
        nodes:
          - {name: split, run: "return None"}
          - {name: review, subgraph: review.yaml, output: {score: score}}
          - {name: plain, run: "return None"}
          - name: join
            fan_in: true
            run: |
              return {"got": {r.branch: r.state.get("score") for r in parallel_results}}
        edges:
          - {from: __start__, to: split}
          - {from: split, to: review, type: parallel, fan_in: join}
          - {from: split, to: plain, type: parallel, fan_in: join}
          - {from: review, to: join}
          - {from: plain, to: join}
        """, "review.yaml": REVIEW})
    with YAMLEngine(isolation=isolation).load_from_file(root / "main.yaml") as graph:
        assert graph.invoke({"doc": "abc"})["got"] == {"review": 13, "plain": None}


# -- errors, named with the chain of files ---------------------------------------------------


def test_an_error_inside_names_the_chain_of_files_the_node_and_the_line(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: sub/review.yaml}
        """, "sub/review.yaml": """\
        nodes:
          - {name: deeper, subgraph: score.yaml}
        """, "sub/score.yaml": """\
        nodes:
          - name: ok
            run: 'return {}'
          - name: broken
            run: |
              return {"x": 1
        """})
    main, review, score = root / "main.yaml", root / "sub" / "review.yaml", root / "sub" / "score.yaml"
    [problem] = problems_of(main)
    assert problem == (f"{main} → {review} → {score}: node 'broken': invalid Python: "
                       f"'{{' was never closed (line 1) ({score}:6)")
    with pytest.raises(GraphError) as caught:
        YAMLEngine().load_from_file(main)
    assert str(caught.value) == problem


def test_problems_across_the_tree_are_all_listed(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: a, subgraph: a.yaml}
          - {name: b, subgraph: b.yaml}
          - {name: c, run: "return {", bogus: 1}
        """, "a.yaml": """\
        nodes:
          - {name: x, run: "-- lua", lnguage: lua}
        """, "b.yaml": """\
        nodes: [{name: y, run: "return 1"}]
        edges:
          - {from: y, to: nowhere}
        """})
    main = root / "main.yaml"
    problems = problems_of(main)
    assert len(problems) == 4, problems
    assert any(p.startswith(f"{main}: node 'c': unknown key 'bogus'") for p in problems)
    assert any(p.startswith(f"{main}: node 'c': invalid Python") for p in problems)
    assert any(p.startswith(f"{main} → {root / 'a.yaml'}: node 'x': unknown key 'lnguage'")
               for p in problems)
    assert f"{main} → {root / 'b.yaml'}: edges[0] (y -> nowhere): unknown node 'nowhere' " \
           f"in 'to'" in problems


def test_invalid_yaml_in_an_inner_file_names_the_chain_line_and_column(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml}
        """, "review.yaml": "nodes: [\n  - {name: a\n"})
    [problem] = problems_of(root / "main.yaml")
    assert problem.startswith(f"{root / 'main.yaml'} → {root / 'review.yaml'}:2:3: invalid YAML")


def test_a_missing_file_names_the_resolved_path_and_the_node(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: ./parts/../reviw.yaml}
        """})
    [problem] = problems_of(root / "main.yaml")
    assert problem == (f"{root / 'main.yaml'}: node 'review': subgraph './parts/../reviw.yaml': "
                       f"{str(root / 'reviw.yaml')!r} does not exist")


@pytest.mark.parametrize("key, value", [("run", "return {}"), ("file", "a.py"),
                                        ("language", "lua"), ("lua", "return 1")])
def test_subgraph_and_code_on_one_node_is_an_error_naming_the_node_and_both_keys(
        files, key, value):
    root = files({"main.yaml": f"""\
        nodes:
          - {{name: review, subgraph: review.yaml, {key}: {json.dumps(value)}}}
        """, "review.yaml": REVIEW})
    [problem] = problems_of(root / "main.yaml")
    assert problem.startswith(f"{root / 'main.yaml'}: node 'review': 'subgraph' and {key!r} on "
                              f"one node")


def test_input_or_output_on_a_node_that_is_no_subgraph_is_an_error(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: a, run: "return {}", input: {x: y}}
        """})
    [problem] = problems_of(root / "main.yaml")
    assert problem.startswith(f"{root / 'main.yaml'}: node 'a': 'input' belongs to subgraph nodes")


def test_a_mapping_that_is_not_keys_to_keys_names_the_node(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml, output: [score]}
        """, "review.yaml": REVIEW})
    [problem] = problems_of(root / "main.yaml")
    assert "node 'review'" in problem and "output" in problem


# -- cycles and diamonds ---------------------------------------------------------------------


def test_a_file_including_itself_is_a_cycle(files):
    root = files({"a.yaml": """\
        nodes:
          - {name: again, subgraph: a.yaml}
        """})
    a = root / "a.yaml"
    [problem] = problems_of(a)
    assert problem == f"{a}: node 'again': subgraph 'a.yaml' includes itself: {a} → {a}"


def test_a_cycle_through_other_files_names_every_file_of_it(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: first, subgraph: a.yaml}
        """, "a.yaml": """\
        nodes:
          - {name: to_b, subgraph: sub/b.yaml}
        """, "sub/b.yaml": """\
        nodes:
          - {name: back, subgraph: ../a.yaml}
        """})
    main, a, b = root / "main.yaml", root / "a.yaml", root / "sub" / "b.yaml"
    [problem] = problems_of(main)
    # Named the way the chain spelt each file; the cycle is a → b → a, not main.
    assert problem == (f"{main} → {a} → {b}: node 'back': subgraph '../a.yaml' includes "
                       f"itself: {a} → {b} → {a}")


def test_the_same_file_used_twice_is_no_cycle(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: left, subgraph: left.yaml}
          - {name: right, subgraph: right.yaml}
        """, "left.yaml": """\
        nodes:
          - {name: shared, subgraph: shared.yaml, output: {left: n}}
        """, "right.yaml": """\
        nodes:
          - {name: shared, subgraph: shared.yaml, output: {right: n}}
        """, "shared.yaml": """\
        nodes:
          - name: count
            run: 'return {"n": state.get("n", 0) + 1}'
        """})
    with load(root / "main.yaml") as graph:
        assert graph.invoke({"n": 5}) == {"n": 5, "left": 6, "right": 6}


# -- Lua-only --------------------------------------------------------------------------------


LUA_REVIEW = """\
    nodes:
      - name: count
        language: lua
        run: |
          return {words = #state.doc}
    """


def test_a_lua_only_tree_loads_and_runs(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: parts/review.yaml, output: {n: words}}
        """, "parts/review.yaml": LUA_REVIEW})
    with load(root / "main.yaml", allow_python=False) as graph:
        assert graph.invoke({"doc": "abcd"}) == {"doc": "abcd", "n": 4}


@pytest.mark.parametrize("reference", ["../outside.yaml", "{root}/outside.yaml", "link.yaml"])
def test_lua_only_refuses_a_subgraph_path_leaving_the_files_directory(files, reference):
    root = files({"agent/main.yaml": "nodes: [{name: x, subgraph: REF}]\n",
                  "outside.yaml": LUA_REVIEW})
    main = root / "agent" / "main.yaml"
    main.write_text(main.read_text().replace("REF", reference.format(root=root)))
    (root / "agent" / "link.yaml").symlink_to(root / "outside.yaml")
    [problem] = problems_of(main, allow_python=False)
    assert problem.startswith(f"{main}: node 'x': subgraph ")
    assert problem.endswith("(allow_python=False)")
    # The same tree is fine for a trusted caller.
    assert problems_of(main) == []


def test_lua_only_confines_each_file_to_its_own_directory(files):
    # parts/review.yaml may not reach back up to a sibling of its directory.
    root = files({"main.yaml": "nodes: [{name: x, subgraph: parts/review.yaml}]\n",
                  "parts/review.yaml": "nodes: [{name: y, subgraph: ../other.yaml}]\n",
                  "other.yaml": LUA_REVIEW})
    [problem] = problems_of(root / "main.yaml", allow_python=False)
    assert problem.startswith(f"{root / 'main.yaml'} → {root / 'parts' / 'review.yaml'}: "
                              f"node 'y': subgraph '../other.yaml' must not contain '..'")


def test_lua_only_refuses_a_python_node_anywhere_in_the_tree_naming_file_and_node(files):
    root = files({"main.yaml": "nodes: [{name: review, subgraph: review.yaml}]\n",
                  "review.yaml": REVIEW})
    [problem] = problems_of(root / "main.yaml", allow_python=False)
    assert problem.startswith(f"{root / 'main.yaml'} → {root / 'review.yaml'}: node 'score': "
                              f"the node body is Python, which this engine refuses")


# -- durability --------------------------------------------------------------------------------


def test_editing_an_inner_file_makes_resume_a_graph_changed_error(files):
    from isobranch.checkpoint import GraphChangedError

    root = files({"main.yaml": """\
        variables: {marker: MARKER}
        nodes:
          - {name: review, subgraph: review.yaml}
          - name: gate
            run: |
              import os
              if os.path.exists(variables["marker"]):
                  raise RuntimeError("not yet")
              return {"done": True}
        """, "review.yaml": REVIEW})
    main = root / "main.yaml"
    marker = root / "marker"
    main.write_text(main.read_text().replace("MARKER", str(marker)))
    marker.touch()
    checkpointer = SqliteCheckpointer(root / "runs.db")
    engine = YAMLEngine(isolation="inline", checkpointer=checkpointer)
    with engine.load_from_file(main) as graph, pytest.raises(GraphExecutionError):
        graph.invoke({"doc": "abc"}, config={"run_id": "r"})
    marker.unlink()
    review = root / "review.yaml"
    review.write_text(review.read_text().replace('variables["bonus"]', 'variables["bonus"] + 1'))
    with engine.load_from_file(main) as graph:
        with pytest.raises(GraphChangedError) as caught:
            graph.resume("r")
        assert "score" in str(caught.value)
    # Unchanged, it resumes.
    review.write_text(textwrap.dedent(REVIEW))
    with engine.load_from_file(main) as graph:
        assert graph.resume("r")["done"] is True


# -- the command: validate and graph on the whole tree ---------------------------------------


def isobranch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isobranch", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=plain_environment())


def test_validate_reports_the_problems_of_every_file_of_the_tree(files):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: parts/review.yaml}
          - {name: bad, run: "return {"}
        """, "parts/review.yaml": """\
        nodes:
          - {name: inner, run: "return {"}
        """})
    result = isobranch("validate", "main.yaml", cwd=root)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("main.yaml: node 'bad': invalid Python")
    assert lines[1].startswith("main.yaml → parts/review.yaml: node 'inner': invalid Python")
    assert lines[1].endswith("(parts/review.yaml:2)")


def test_validate_lua_only_refuses_a_python_node_in_an_inner_file(files):
    root = files({"main.yaml": "nodes: [{name: review, subgraph: review.yaml}]\n",
                  "review.yaml": REVIEW})
    result = isobranch("validate", "--lua-only", "main.yaml", cwd=root)
    assert result.returncode == 2, result
    assert result.stderr.startswith("main.yaml → review.yaml: node 'score': the node body is "
                                    "Python")
    assert isobranch("validate", "main.yaml", cwd=root).stdout == "main.yaml: ok\n"


@pytest.mark.parametrize("fmt, cluster", [("mermaid", 'subgraph n_review__cluster ["review"]'),
                                          ("dot", "subgraph cluster_n_review__cluster {")])
def test_graph_draws_a_subgraph_node_as_a_cluster_of_its_inner_nodes(files, fmt, cluster):
    root = files({"main.yaml": """\
        nodes:
          - {name: review, subgraph: review.yaml}
          - {name: after, run: "return {}"}
        """, "review.yaml": REVIEW})
    result = isobranch("graph", "--format", fmt, "main.yaml", cwd=root)
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert cluster in [line.strip() for line in lines]
    text = result.stdout
    for inner in ("n_review__count", "n_review__score", "n_review____start__",
                  "n_review____end__"):
        assert inner in text
    # The outer edges reach the inner START and leave from the inner END.
    assert ("n___start__ -> n_review____start__" in text
            or 'n___start__["__start__"] --> n_review____start__' in text)
    assert ("n_review____end__ -> n_after" in text
            or 'n_review____end__["__end__"] --> n_after' in text)


# -- the example -------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_the_batch_review_example_runs_a_review_sub_agent_per_document(isolation):
    result = isobranch("run", str(BATCH_REVIEW), "--isolation", isolation, cwd=ROOT / "docs")
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout)
    assert final["verdicts"] == ["accept", "reject", "accept", "revise"]
    assert final["accepted"] == 2
    assert final["scores"] == [0.25, 0.0, 0.111, 0.083]
    # The sub-agent's own keys stayed inside it.
    assert not {"words", "long_words", "doc"} & set(final)


def test_the_batch_review_example_validates_and_its_review_runs_alone():
    assert YAMLEngine().validate_file(BATCH_REVIEW) == []
    with YAMLEngine(isolation="inline").load_from_file(BATCH_REVIEW.parent / "review.yaml") as g:
        final = g.invoke({"doc": {"id": 0, "text": "one two three"}})
    assert final["verdict"] == "reject"
