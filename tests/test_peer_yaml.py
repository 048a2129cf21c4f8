"""Agents in the_edge_agent's YAML format (docs/peer-yaml.md): each key, on thread and process."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from isobranch import GraphExecutionError, YAMLEngine

BACKENDS = ["thread", "process"]


def run(text: str, isolation: str, state: dict | None = None, **engine) -> dict:
    document = yaml.safe_load(textwrap.dedent(text))
    with YAMLEngine(isolation=isolation, **engine).load_from_dict(document) as graph:
        return graph.invoke(state or {})


def problems(text: str) -> list[str]:
    return YAMLEngine().validate_dict(yaml.safe_load(textwrap.dedent(text)))


ROUTER = """
    name: router
    version: "1.0"
    config: {raise_exceptions: true}
    state_schema: {value: int, path: str}
    nodes:
      - name: start
        run: |
          return {"value": state["value"] + 1}
        goto:
          - if: "{{ state.value > 10 }}"
            to: big
          - if: "state.value > 3"
            to: medium
          - to: small
      - name: big
        run: |
          return {"path": "big"}
        goto: __end__
      - name: medium
        run: |
          return {"path": "medium"}
        goto: __end__
      - name: small
        run: |
          return {"path": "small"}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
@pytest.mark.parametrize(("value", "path"), [(20, "big"), (5, "medium"), (0, "small")])
def test_goto_rules_route_with_jinja_and_attribute_conditions(isolation, value, path):
    assert run(ROUTER, isolation, {"value": value}) == {"value": value + 1, "path": path}


CHAIN = """
    state_schema: {trail: list}
    initial_state: {trail: [], label: initial}
    nodes:
      - name: a
        run: |
          return {"trail": state["trail"] + ["a"]}
      - name: b
        language: lua
        run: |
          local trail = state.trail
          trail[#trail + 1] = "b"
          return {trail = trail}
      - name: c
        run: |
          return {"trail": state["trail"] + ["c"]}
    edges:
      - {from: a, to: c}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_node_without_outgoing_edge_chains_to_the_next(isolation):
    # a has an edge (to c); c has none and is last: ends. b is never reached.
    final = run(CHAIN, isolation)
    assert final["trail"] == ["a", "c"]
    # The same file with a's edge gone: a -> b -> c by the format's chaining.
    chained = CHAIN.replace("    edges:\n      - {from: a, to: c}\n", "")
    assert run(chained, isolation)["trail"] == ["a", "b", "c"]


@pytest.mark.parametrize("isolation", BACKENDS)
def test_initial_state_lies_under_the_input(isolation):
    final = run(CHAIN, isolation, {"label": "given"})
    assert final["label"] == "given" and final["trail"] == ["a", "c"]
    assert run(CHAIN, isolation)["label"] == "initial"


EDGE_CONDITIONS = """
    version: 2
    state_schema: {ok: bool, flagged: bool, result: str}
    nodes:
      - name: check
        run: |
          return None
      - name: accept
        run: |
          return {"result": "accepted"}
        goto: __end__
      - name: reject
        run: |
          return {"result": "rejected"}
        goto: __end__
      - name: flag
        run: |
          return {"result": "flagged"}
        goto: __end__
    edges:
      - {from: __start__, to: check}
      - {from: check, to: flag, when: "!ok"}
      - from: check
        to: accept
        condition: {type: expression, value: "{{ state.flagged }}"}
        when: false
      - {from: check, to: reject, condition: "state.flagged"}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
@pytest.mark.parametrize(("state", "result"), [
    ({"ok": False}, "flagged"),
    ({"ok": True, "flagged": False}, "accepted"),
    ({"ok": True, "flagged": True}, "rejected"),
])
def test_edge_condition_and_when_shorthands(isolation, state, result):
    assert run(EDGE_CONDITIONS, isolation, state)["result"] == result


DYNAMIC = """
    state_schema: {docs: list, lengths: list}
    nodes:
      - name: split
        run: |
          return {"docs": ["a", "bbb", "cc"]}
      - name: measure
        type: dynamic_parallel
        items: "{{ state.docs }}"
        item_var: doc
        index_var: i
        max_concurrency: 2
        steps:
          - name: length
            run: |
              return {"length": len(state["doc"])}
          - name: tag
            language: lua
            run: |
              return {tag = state.i .. ":" .. state.length}
        output: lengths
      - name: report
        run: |
          return {"tags": [r.state["tag"] for r in state["lengths"]]}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_dynamic_parallel_runs_its_steps_once_per_item(isolation):
    final = run(DYNAMIC, isolation)
    assert final["tags"] == ["0:1", "1:3", "2:2"]
    assert [r.index for r in final["lengths"]] == [0, 1, 2]


@pytest.mark.parametrize("isolation", BACKENDS)
def test_dynamic_parallel_with_a_subgraph_and_a_fan_in(isolation, tmp_path):
    (tmp_path / "double.yaml").write_text(textwrap.dedent("""\
        nodes:
          - name: double
            run: |
              return {"doubled": state["n"] * 2}
    """), encoding="utf-8")
    (tmp_path / "main.yaml").write_text(textwrap.dedent("""\
        initial_state: {numbers: [1, 2, 3]}
        nodes:
          - name: each
            type: dynamic_parallel
            items: "{{ state.numbers }}"
            item_var: number
            subgraph: double.yaml
            input: {n: "{{ number }}"}
            fan_in: total
          - name: total
            fan_in: true
            run: |
              return {"total": sum(r.state["doubled"] for r in parallel_results)}
    """), encoding="utf-8")
    with YAMLEngine(isolation=isolation).load_from_file(tmp_path / "main.yaml") as graph:
        assert graph.invoke({})["total"] == 12


def test_a_node_interrupt_is_a_breakpoint(tmp_path):
    document = yaml.safe_load(textwrap.dedent("""\
        nodes:
          - name: draft
            run: |
              return {"draft": "hello"}
          - name: send
            interrupt: before
            run: |
              return {"sent": True}
    """))
    document["settings"] = {"checkpoint": {"path": str(tmp_path / "runs.db")}}
    with YAMLEngine().load_from_dict(document) as graph:
        paused = graph.invoke({}, config={"run_id": "r1"})
        assert "sent" not in paused and paused["draft"] == "hello"
        assert graph.resume("r1")["sent"] is True


def test_a_failing_jinja_expression_names_the_node_and_the_expression():
    document = ROUTER.replace("{{ state.value > 10 }}", "{{ state.value > 'x' }}")
    with pytest.raises(GraphExecutionError) as caught:
        run(document, "inline", {"value": 1})
    message = str(caught.value)
    assert "node 'start'" in message and "state.value > 'x'" in message


@pytest.mark.parametrize(("change", "expected"), [
    (("{{ state.value > 10 }}", "{{ state.value > }}"),
     "node 'start': goto[0]: 'if' '{{ state.value > }}' is invalid Jinja2"),
    (("state.value > 3", "state.value >"), "'if' 'state.value >' is neither Python nor Jinja2"),
    (("to: medium", "to: mediun"), "node 'start': goto[1]: goto to unknown node 'mediun'"),
    (("{{ state.value > 10 }}", "{{ state.valeu > 10 }}"),
     "reads state key 'valeu', which state_schema does not declare"),
    (("state.value > 3", "state['valu'] > 3"),
     "reads state key 'valu', which state_schema does not declare"),
    (("{{ state.value > 10 }}", "{{ secrets.key }}"), "reads 'secrets': secrets are not supported"),
])
def test_validate_catches_what_would_fail_at_run_time(change, expected):
    found = problems(ROUTER.replace(*change))
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(("node_extra", "expected"), [
    ("uses: http.get", "node 'a': uses: not supported: built-in actions are not supported"),
    ("language: prolog", "node 'a': language: prolog: not supported"),
    ("output: result", "node 'a': output: not supported"),
    ("steps: []", "node 'a': steps: not supported"),
])
def test_unsupported_node_keys_are_named(node_extra, expected):
    found = problems(f"""
        nodes:
          - name: a
            {node_extra}
            run: |
              return None
    """)
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(("top", "expected"), [
    ("imports: [{path: x.py, namespace: x}]", "imports: not supported"),
    ("settings: {llm: {model: x}}", "settings.llm: not supported: LLM settings"),
    ("config: {checkpoint_dir: ./c}", "config.checkpoint_dir: not supported; use settings.checkpoint.path"),
    ("config: {raise_exceptions: false}", "config.raise_exceptions: only true is supported"),
])
def test_unsupported_top_level_keys_are_named(top, expected):
    found = problems(f"""
        version: "1"
        {top}
        nodes:
          - name: a
            run: |
              return None
    """)
    assert any(expected in problem for problem in found), found


def test_while_loop_and_parallel_strategy_are_named_as_unsupported():
    found = problems("""
        nodes:
          - name: loop
            type: while_loop
            condition: "state.n < 3"
            max_iterations: 5
            body: []
          - name: a
            run: |
              return None
          - name: b
            run: |
              return None
          - name: c
            fan_in: true
            run: |
              return None
        edges:
          - {from: a, to: b, type: parallel, fan_in: c, parallel_strategy: process}
    """)
    assert any("type: while_loop is not supported" in p for p in found), found
    assert any("parallel_strategy: not supported" in p for p in found), found


def test_isobranch_conditions_read_state_as_attributes_too():
    document = {"nodes": [{"name": "a", "run": "return {'n': 2}"},
                          {"name": "big", "run": "return {'size': 'big'}"}],
                "edges": [{"from": "a", "to": "big", "when": "state.n > 1 and state.missing is None"}]}
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph:
        assert graph.invoke({})["size"] == "big"


def test_a_condition_cannot_change_the_state():
    document = {"nodes": [{"name": "a", "run": "return {'n': 2}"},
                          {"name": "b", "run": "return None"}],
                "edges": [{"from": "a", "to": "b", "when": "state.update({'n': 3})"}]}
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph, \
            pytest.raises(GraphExecutionError, match="read-only"):
        graph.invoke({})
