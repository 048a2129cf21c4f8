"""Agents in the_edge_agent's YAML format (docs/peer-yaml.md): each key, on thread and process."""

from __future__ import annotations

import textwrap
import threading

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
    ("output: [a, b]", "node 'a': output: must be the state key the node's result is stored "
                       "under, got ['a', 'b']"),
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
    ("config: {raise_exceptions: 'no'}", "config.raise_exceptions: must be true or false, got 'no'"),
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


def test_parallel_strategy_is_named_as_unsupported():
    found = problems("""
        nodes:
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
    assert any("parallel_strategy: not supported" in p for p in found), found


COUNTER_LOOP = """
    name: counter
    state_schema: {count: int, sum: int, trail: list, after: int}
    nodes:
      - name: count_loop
        type: while_loop
        condition: "{{ state.count < variables.limit }}"
        max_iterations: 10
        body:
          - name: increment
            run: |
              -- lua
              local count = state.count or 0
              return { count = count + 1 }
          - name: add
            run: |
              return {"sum": state["sum"] + state["count"],
                      "trail": state["trail"] + [state["count"]]}
      - name: after
        run: |
          return {"after": state["sum"] * 10}
    variables: {limit: 5}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_while_loop_runs_its_body_in_order_until_the_condition_is_false(isolation):
    # Each body node sees the one before it (add reads the count increment set), each
    # iteration the last, the condition the latest state; the loop then chains on.
    final = run(COUNTER_LOOP, isolation, {"count": 0, "sum": 0, "trail": []})
    assert final == {"count": 5, "sum": 15, "trail": [1, 2, 3, 4, 5], "after": 150}


@pytest.mark.parametrize("isolation", BACKENDS)
def test_while_loop_stops_after_max_iterations_without_an_error(isolation):
    text = COUNTER_LOOP.replace("max_iterations: 10", "max_iterations: 3")
    final = run(text, isolation, {"count": 0, "sum": 0, "trail": []})
    assert final == {"count": 3, "sum": 6, "trail": [1, 2, 3], "after": 60}


def test_while_loop_whose_condition_is_false_at_first_runs_no_body():
    final = run(COUNTER_LOOP, "thread", {"count": 7, "sum": 1, "trail": []})
    assert final == {"count": 7, "sum": 1, "trail": [], "after": 10}


@pytest.mark.parametrize("isolation", BACKENDS)
def test_while_loop_as_a_dynamic_parallel_step_loops_in_each_branch(isolation):
    text = """
        nodes:
          - name: fan
            type: dynamic_parallel
            items: "{{ state.starts }}"
            item_var: n
            steps:
              - name: loop
                type: while_loop
                condition: "state.n < 4"
                max_iterations: 10
                body:
                  - name: up
                    run: |
                      return {"n": state["n"] + 1, "steps": state.get("steps", 0) + 1}
            output: done
          - name: total
            run: |
              return {"steps": [r.state["steps"] for r in state["done"]]}
    """
    final = run(text, isolation, {"starts": [0, 2, 3]})
    assert final["steps"] == [4, 2, 1]


def test_while_loop_body_failure_names_the_loop_the_body_node_and_the_iteration():
    text = """
        nodes:
          - name: refine
            type: while_loop
            condition: "state.n < 5"
            max_iterations: 10
            body:
              - name: step
                run: |
                  if state["n"] == 2:
                      raise ValueError("two is not allowed")
                  return {"n": state["n"] + 1}
    """
    with pytest.raises(GraphExecutionError) as caught:
        run(text, "thread", {"n": 0})
    message = str(caught.value)
    assert "node 'refine' failed" in message, message
    assert "while_loop 'refine': body node 'refine.step' failed at iteration 2" in message
    assert "ValueError: two is not allowed" in message


def test_while_loop_condition_failure_is_named_with_the_condition():
    text = """
        nodes:
          - name: refine
            type: while_loop
            condition: "{{ state.n < 5 }}"
            max_iterations: 10
            body:
              - name: step
                run: |
                  return {"n": None}
    """
    with pytest.raises(GraphExecutionError) as caught:
        run(text, "thread", {"n": 0})
    assert "while_loop 'refine': condition '{{ state.n < 5 }}' failed at iteration 1" \
        in str(caught.value), str(caught.value)


LOOP_TEMPLATE = """
    state_schema: {{n: int}}
    nodes:
      - name: loop
        type: while_loop
        {extra}
        body:
          - name: step
            run: |
              return {{"n": state["n"] + 1}}
"""


@pytest.mark.parametrize(("extra", "expected"), [
    ('condition: "state.n < 3"', "node 'loop': a while_loop node needs 'max_iterations'"),
    ('condition: "state.n < 3"\n        max_iterations: 0',
     "node 'loop': max_iterations: must be an integer from 1 to 1000, got 0"),
    ('condition: "state.n < 3"\n        max_iterations: 1001',
     "max_iterations: must be an integer from 1 to 1000, got 1001"),
    ('condition: "state.n < 3"\n        max_iterations: "5"',
     "max_iterations: must be an integer from 1 to 1000, got '5'"),
    ('condition: "state.n < 3"\n        max_iterations: true',
     "max_iterations: must be an integer from 1 to 1000, got True"),
    ("max_iterations: 5", "node 'loop': a while_loop node needs 'condition'"),
    ('condition: "{{ state.n < }}"\n        max_iterations: 5',
     "node 'loop': 'condition' '{{ state.n < }}' is invalid Jinja2"),
    ('condition: "state.m < 3"\n        max_iterations: 5',
     "node 'loop': 'condition' 'state.m < 3' reads state key 'm', which state_schema does "
     "not declare"),
    ('condition: "state.n < 3"\n        max_iterations: 5\n        retry: {max_attempts: 2}',
     "node 'loop': retry: not a key of a while_loop node"),
])
def test_while_loop_definition_problems_are_named(extra, expected):
    found = problems(LOOP_TEMPLATE.format(extra=extra))
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(("body", "expected"), [
    ("body: []", "node 'loop': body: must be a non-empty list of nodes"),
    ("body: [{name: inner, type: while_loop, condition: 'true', max_iterations: 2, "
     "body: [{name: s, run: return None}]}]",
     "node 'loop': body[0]: nested while_loop 'inner': a while_loop's body cannot hold"),
    ("body: [{name: s, goto: __end__, run: return None}]",
     "node 'loop': body[0] ('s'): goto: a while_loop's body nodes run in order"),
    ("body: [{name: s, uses: llm.call}]", "node 'loop.s': uses: not supported"),
    ("body: [{name: s, run: 'return {'}]", "node 'loop': body node 'loop.s': invalid Python"),
])
def test_while_loop_body_problems_are_named(body, expected):
    found = problems(f"""
        nodes:
          - name: loop
            type: while_loop
            condition: "state.n < 3"
            max_iterations: 5
            {body}
    """)
    assert any(expected in problem for problem in found), found


OUTPUT = """
    state_schema: {doubled: int, pair: dict}
    nodes:
      - name: double
        run: |
          return state["n"] * 2
        output: doubled
      - name: pair
        run: |
          -- lua
          return {a = state.n, b = "x"}
        output: pair
      - name: nothing
        run: |
          if state["n"] < 0:
              return 1
        output: none
      - name: assigned
        run: |
          x = state["n"] + 1
        output: names
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_output_stores_what_the_code_returned_under_the_key(isolation):
    final = run(OUTPUT, isolation, {"n": 4})
    assert final == {"n": 4, "doubled": 8, "pair": {"a": 4, "b": "x"}, "none": None,
                     "names": {"x": 5}}


def test_output_keys_count_as_declared_for_validation():
    text = OUTPUT.replace("state_schema: {doubled: int, pair: dict}",
                          "state_schema: {n: int}") + """
        goto:
          - if: "{{ state.doubled > 3 }}"
            to: double
          - to: __end__
    """
    assert problems(text) == []


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


def test_raise_exceptions_false_is_accepted_and_a_failure_still_raises():
    text = """
        config: {raise_exceptions: false}
        nodes:
          - name: a
            run: |
              return {"n": state.get("n", 0) + 1}
          - name: b
            run: |
              if state["n"] > 1:
                  raise RuntimeError("boom")
              return {"ok": True}
    """
    assert run(text, "thread", {}) == {"n": 1, "ok": True}
    with pytest.raises(GraphExecutionError, match="node 'b' failed: RuntimeError: boom") as caught:
        run(text, "thread", {"n": 1})
    assert caught.value.state == {"n": 2}


@pytest.mark.parametrize("isolation", BACKENDS)
def test_lua_code_without_a_lua_line_is_recognised_as_the_format_does(isolation):
    text = """
        version: "1"
        nodes:
          - name: marked
            run: |
              --lua
              return {a = "x" .. "y"}
          - name: unmarked
            run: |
              local b = state.a .. "z"
              return {b = b}
          - name: python_that_mentions_end
            run: |
              return {"c": state["b"] + " then the end .."}
    """
    assert run(text, isolation) == {"a": "xy", "b": "xyz", "c": "xyz then the end .."}


@pytest.mark.parametrize(("settings", "expected"), [
    ("{auto_trace: true}", "settings.auto_trace: not supported: trace settings"),
    ("{auto_trace: false, trace_file: t.jsonl}", "settings.trace_file: not supported: trace settings"),
    ("{model: gpt-4o-mini, temperature: 0.7}", "settings.model: not supported: LLM settings"),
])
def test_the_formats_settings_mark_a_document_and_are_named_once(settings, expected):
    found = problems(f"""
        settings: {settings}
        nodes:
          - name: a
            run: |
              return None
    """)
    assert any(expected in problem for problem in found), found
    assert not any("unknown key" in problem for problem in found), found


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_auto_trace_false_is_accepted_as_the_run_traces_nothing(isolation):
    text = """
        settings:
          auto_trace: false
        nodes:
          - name: a
            run: |
              return {"result": "ok"}
    """
    assert run(text, isolation) == {"result": "ok"}


def test_isobranch_validate_names_each_node_and_expression_of_a_peer_document(tmp_path, capfd):
    from isobranch.cli import main
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent("""
        version: "1"
        state_schema: {n: int}
        nodes:
          - name: start
            run: |
              return {"n": 1}
            goto:
              - if: "{{ state.n > }}"
                to: loop
              - if: "state.n == 2"
                to: nowhere
              - to: loop
          - name: loop
            type: while_loop
            condition: "state.count < 3"
            max_iterations: 5
            body:
              - name: step
                run: |
                  return {"n": state["n"] + 1}
          - name: reason
            language: prolog
            run: |
              state(n, N),
              N2 is N * 2,
              return(n, N2).
    """))
    assert main(["validate", str(path)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert all(line.startswith(str(path)) for line in lines), lines
    expected = [
        "node 'start': goto[0]: 'if' '{{ state.n > }}' is invalid Jinja2",
        "node 'start': goto[1]: goto to unknown node 'nowhere'",
        "node 'loop': 'condition' 'state.count < 3' reads state key 'count', which "
        "state_schema does not declare",
        "node 'reason': language: prolog: not supported",
    ]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    # One line per problem: the Prolog body is not also reported as invalid Python.
    assert len(lines) == len(expected), lines


def test_fail_fast_on_a_dynamic_parallel_node_must_be_a_boolean():
    found = problems("""
        nodes:
          - name: fan
            type: dynamic_parallel
            items: "{{ state.xs }}"
            fail_fast: "yes"
            action:
              run: |
                return None
    """)
    assert any("node 'fan': fail_fast: must be true or false, got 'yes'" in p
               for p in found), found


@pytest.mark.parametrize("isolation", BACKENDS)
def test_python_code_has_json_and_datetime_as_the_format_gives_them(isolation):
    text = """
        version: "1"
        nodes:
          - name: encode
            run: |
              return {"text": json.dumps({"a": 1}), "year": datetime.date(2024, 5, 1).year}
    """
    assert run(text, isolation) == {"text": '{"a": 1}', "year": 2024}


def test_isobranch_documents_python_code_has_no_json_global():
    document = {"nodes": [{"name": "a", "run": "return {'t': json.dumps(1)}"}]}
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph, \
            pytest.raises(GraphExecutionError, match="NameError: name 'json' is not defined"):
        graph.invoke({})


def test_while_loop_with_a_lua_body_returns_an_empty_lua_table_as_an_empty_list():
    text = """
        state_schema: {items: list, n: int}
        nodes:
          - name: loop
            type: while_loop
            condition: "state.n < 2"
            max_iterations: 5
            body:
              - name: clear
                run: |
                  -- lua
                  return {items = {}, n = state.n + 1}
    """
    assert run(text, "thread", {"items": [1], "n": 0}) == {"items": [], "n": 2}


@pytest.mark.parametrize("isolation", BACKENDS)
def test_python_code_without_return_updates_the_names_it_assigned(isolation):
    text = """
        version: "1"
        nodes:
          - name: compute
            run: |
              import math
              doubled = state["n"] * 2
              _scratch = "not in the state"
              label = f"n={state['n']}"
              def helper():
                  pass
          - name: commented
            run: |
              # the word return here: the format then reads the code as a function body
              ignored = 1
    """
    assert run(text, isolation, {"n": 3}) == {"n": 3, "doubled": 6, "label": "n=3"}


def test_python_code_without_return_keeps_its_line_numbers_in_errors(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text('version: "1"\nnodes:\n  - name: a\n    run: |\n      x = 1\n'
                    '      y = x / 0\n')
    with YAMLEngine(isolation="thread").load_from_file(path) as graph, \
            pytest.raises(GraphExecutionError) as caught:
        graph.invoke({})
    assert f"{path}:6" in str(caught.value), str(caught.value)


TEMPLATED_CODE = """
    version: "1"
    variables: {greeting: hello}
    nodes:
      - name: greet
        run: |
          name = "{{ state.name }}"
          {% if state.loud %}
          name = name.upper()
          {% endif %}
          print("rendered first...")
          return {"text": f"${greeting} {name}", "n": {{ state.n }} + 1}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
@pytest.mark.parametrize(("loud", "text"), [(True, "hello BOB"), (False, "hello bob")])
def test_python_code_is_rendered_as_a_jinja_template_before_it_runs(isolation, loud, text):
    final = run(TEMPLATED_CODE, isolation, {"name": "bob", "loud": loud, "n": 2})
    assert final["text"] == text and final["n"] == 3


def test_templated_code_is_rendered_again_for_each_state():
    document = yaml.safe_load(textwrap.dedent(TEMPLATED_CODE))
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph:
        first = graph.invoke({"name": "ann", "loud": False, "n": 1})
        second = graph.invoke({"name": "bob", "loud": True, "n": 5})
    assert (first["text"], first["n"]) == ("hello ann", 2)
    assert (second["text"], second["n"]) == ("hello BOB", 6)


def test_isobranch_documents_python_code_is_not_rendered():
    document = {"nodes": [{"name": "a", "run": 'return {"t": f"{{x}}", "s": "{{ state.x }}"}'}]}
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph:
        assert graph.invoke({"x": 1}) == {"x": 1, "t": "{x}", "s": "{{ state.x }}"}


def test_lua_code_of_a_peer_document_is_not_rendered():
    text = """
        version: "1"
        nodes:
          - name: a
            run: |
              -- lua
              return {rows = {{n = 1}}, s = "{{ state.x }}"}
    """
    assert run(text, "thread") == {"rows": [{"n": 1}], "s": "{{ state.x }}"}


@pytest.mark.parametrize(("code", "expected"), [
    ('x = "{{ state.name "\nreturn {"x": x}', "its code is a Jinja2 template (it holds {{ }} or "
                                               "{% %}) that does not parse"),
    ('return {"k": "{{ secrets.key }}"}', "reads names it cannot see (it sees 'state' and "
                                          "'variables'): 'secrets': secrets are not supported"),
])
def test_a_template_in_code_that_cannot_be_used_is_named_at_load(code, expected):
    document = {"version": "1", "nodes": [{"name": "tpl", "run": code}]}
    found = YAMLEngine().validate_dict(document)
    assert any(p.startswith("node 'tpl'") and expected in p for p in found), found


def test_templated_code_that_renders_to_invalid_python_fails_naming_the_node():
    text = """
        version: "1"
        nodes:
          - name: tpl
            run: |
              return {"x": {{ state.expr }}}
    """
    with pytest.raises(GraphExecutionError, match=r"node 'tpl'.*rendered as a Jinja2 template, "
                                                  r"is not valid Python"):
        run(text, "thread", {"expr": "1 +"})


def test_templated_code_keeps_its_file_lines_in_errors(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text('version: "1"\nnodes:\n  - name: a\n    run: |\n      x = {{ state.n }}\n'
                    '      return {"y": x / 0}\n')
    with YAMLEngine(isolation="thread").load_from_file(path) as graph, \
            pytest.raises(GraphExecutionError) as caught:
        graph.invoke({"n": 1})
    assert f"{path}:6" in str(caught.value), str(caught.value)


UNMARKED_LUA = """
    name: simple
    nodes:
      - name: process
        run: |
          -- Lua code
          return { result = "processed: " .. (state.input or "none") }
      - name: finalize
        run: |
          return { output = state.result .. " - done" }
    edges:
      - {from: __start__, to: process}
      - {from: process, to: finalize}
      - {from: finalize, to: __end__}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_document_without_format_keys_whose_code_is_unmarked_lua_is_the_peers(isolation):
    assert run(UNMARKED_LUA, isolation, {"input": "x"}) == {
        "input": "x", "result": "processed: x", "output": "processed: x - done"}


def test_isobranch_document_with_unmarked_lua_says_what_to_add():
    document = yaml.safe_load(textwrap.dedent(UNMARKED_LUA))
    document["nodes"][1]["retry"] = {"max_attempts": 2}  # a key only isobranch's format has
    found = YAMLEngine().validate_dict(document)
    assert len(found) == 1 and found[0].startswith("node 'finalize': invalid Python:"), found
    assert "it is valid Lua: to run it as Lua, add 'language: lua'" in found[0]


def test_isobranch_document_with_a_python_syntax_error_still_reports_it_with_its_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("nodes:\n  - name: broken\n    run: |\n      x = state['a'] .. 1\n"
                    "      return {'b': x\n")
    found = YAMLEngine().validate_file(path)
    assert len(found) == 1 and "node 'broken': invalid Python: invalid syntax" in found[0], found
    assert f"{path}:4" in found[0] and "valid Lua" not in found[0]


CHECKPOINT_DIR_AGENT = """\
    name: approval
    state_schema: {value: int, message: str}
    nodes:
      - name: step1
        run: |
          return {"value": state.get("value", 0) + 1, "message": "step 1"}
      - name: step2
        run: |
          return {"value": state["value"] * 2, "message": "step 2"}
    config:
      checkpoint_dir: ./runs/checkpoints
      interrupt_after: [step1]
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_config_checkpoint_dir_records_runs_in_a_database_made_there_on_first_use(
        isolation, tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(CHECKPOINT_DIR_AGENT))
    directory = tmp_path / "runs" / "checkpoints"
    with YAMLEngine(isolation=isolation).load_from_file(path) as graph:
        assert not (tmp_path / "runs").exists()  # loading makes nothing
        paused = graph.invoke({"value": 1}, config={"run_id": "r1"})
        assert (paused["value"], paused["message"]) == (2, "step 1")
        assert (directory / "checkpoints.sqlite").is_file()
    with YAMLEngine(isolation=isolation).load_from_file(path) as graph:
        assert graph.resume("r1") == {"value": 4, "message": "step 2"}


@pytest.mark.parametrize(("change", "expected"), [
    ({"settings": {"checkpoint": {"path": "runs.db"}}},
     "settings.checkpoint and config.checkpoint_dir both name where runs are recorded"),
    ({"config": {"checkpoint_dir": 3}}, "config.checkpoint_dir: must be a directory path, got 3"),
])
def test_config_checkpoint_dir_problems_are_named(change, expected, tmp_path):
    document = {**yaml.safe_load(textwrap.dedent(CHECKPOINT_DIR_AGENT)), **change}
    found = YAMLEngine().validate_dict(document, base_dir=tmp_path)
    assert any(expected in p for p in found), found


def test_config_checkpoint_dir_relative_needs_a_file_or_base_dir():
    found = YAMLEngine().validate_dict(yaml.safe_load(textwrap.dedent(CHECKPOINT_DIR_AGENT)))
    assert any(p.startswith("config.checkpoint_dir: relative path") for p in found), found


FAIL_FAST_MAP = """
    version: "1"
    nodes:
      - name: setup
        run: |
          return {"values": list(range(10))}
      - name: check_all
        type: dynamic_parallel
        items: "{{ state['values'] }}"
        item_var: value
        max_concurrency: 1
        fail_fast: FAIL_FAST
        steps:
          - name: check
            run: |
              if state["value"] == 1:
                  raise ValueError("bad value 1")
              return {"checked": state["value"]}
        output: results
      - name: summary
        run: |
          return {"outcomes": [r.success for r in state["results"]],
                  "errors": [r.error for r in state["results"]]}
"""


@pytest.mark.parametrize("isolation", BACKENDS)
def test_dynamic_parallel_fail_fast_cancels_unstarted_branches_and_goes_on(isolation):
    final = run(FAIL_FAST_MAP.replace("FAIL_FAST", "true"), isolation)
    outcomes, errors = final["outcomes"], final["errors"]
    assert len(outcomes) == 10 and outcomes[0] is True and outcomes[1] is False
    assert "bad value 1" in errors[1]
    # One branch may be handed out while the failure is reported; none after it.
    cancelled = [i for i, error in enumerate(errors)
                 if error and "check_all.check[1]' failed first (fail_fast)" in error]
    assert cancelled and cancelled == list(range(cancelled[0], 10)) and cancelled[0] <= 3
    assert all(outcomes[i] for i in range(2, cancelled[0]))


@pytest.mark.parametrize("isolation", BACKENDS)
def test_dynamic_parallel_without_fail_fast_runs_every_branch(isolation):
    final = run(FAIL_FAST_MAP.replace("FAIL_FAST", "false"), isolation)
    assert final["outcomes"] == [True, False] + [True] * 8


def test_settings_parallel_fail_fast_still_fails_the_run():
    document = yaml.safe_load(textwrap.dedent(FAIL_FAST_MAP.replace("FAIL_FAST", "true")))
    document["settings"] = {"parallel": {"fail_fast": True}}
    with YAMLEngine(isolation="thread").load_from_dict(document) as graph, \
            pytest.raises(GraphExecutionError, match=r"failed \(fail_fast\): .*bad value 1"):
        graph.invoke({})


def test_a_map_edge_that_cancels_unstarted_branches_lets_running_ones_finish():
    # Branch 0 runs until the driver has reported branch 1's failure (its branch event):
    # it must then finish with its own result, not be cancelled with the unstarted ones.
    from isobranch import StateGraph
    reported = threading.Event()

    def check(state):
        if state["item"] == 1:
            raise ValueError("bad item 1")
        if state["item"] == 0:
            assert reported.wait(30), "branch 1's failure was never reported"
        return {"checked": state["item"]}

    graph = StateGraph()
    graph.add_node("start", lambda state: None)
    graph.add_node("check", check)
    graph.add_fan_in_node("join", lambda state, results: {"ok": [r.success for r in results],
                                                           "errors": [r.error for r in results]})
    graph.set_entry_point("start")
    graph.add_map_edge("start", "check", over="items", fan_in="join", max_concurrency=2,
                       cancel_unstarted_on_failure=True)
    graph.add_edge("join", "__end__")
    with graph.compile(isolation="thread") as compiled:
        for event in compiled.stream({"items": list(range(6))}):
            if event["type"] == "branch" and event["index"] == 1:
                reported.set()
            if event["type"] == "final":
                final = event["state"]
    assert final["ok"][:2] == [True, False]
    assert all("failed first (fail_fast)" in error for error in final["errors"][3:])


@pytest.mark.parametrize("isolation", BACKENDS)
def test_a_map_edge_that_cancels_unstarted_branches_reports_every_branch(isolation):
    # A stream shows one branch event per item, the cancelled ones too, each with the
    # result the fan-in gets for it: a cancelled branch is never silent.
    document = yaml.safe_load(textwrap.dedent(FAIL_FAST_MAP.replace("FAIL_FAST", "true")))
    with YAMLEngine(isolation=isolation).load_from_dict(document) as graph:
        events = list(graph.stream({}))
    branches = {event["index"]: event for event in events if event["type"] == "branch"}
    final = events[-1]["state"]
    assert sorted(branches) == list(range(10))
    assert [branches[i]["success"] for i in range(10)] == final["outcomes"]
    cancelled = [i for i in range(10) if branches[i]["error_type"] == "Cancelled"]
    assert cancelled and cancelled == list(range(cancelled[0], 10))
    done = [event["done"] for event in events if event["type"] == "branch"]
    assert done == list(range(1, 11))


def fingerprint(text: str) -> dict[str, str]:
    with YAMLEngine().load_from_dict(yaml.safe_load(textwrap.dedent(text))) as graph:
        return graph.fingerprint()


@pytest.mark.parametrize(("document", "node", "old", "new"), [
    (TEMPLATED_CODE, "greet", 'name = name.upper()', 'name = name.lower()'),
    (COUNTER_LOOP, "count_loop", 'return { count = count + 1 }', 'return { count = count + 2 }'),
    (COUNTER_LOOP, "count_loop", 'state["sum"] + state["count"]', 'state["sum"] - state["count"]'),
    (COUNTER_LOOP, "count_loop", "state.count < variables.limit", "state.count <= variables.limit"),
    (COUNTER_LOOP, "count_loop", "max_iterations: 10", "max_iterations: 20"),
    (OUTPUT, "double", 'return state["n"] * 2', 'return state["n"] * 3'),
    (OUTPUT, "double", "output: doubled", "output: tripled"),
])
def test_a_peer_nodes_fingerprint_changes_with_its_code(document, node, old, new):
    # The fingerprint is what resume checks a recorded run against and what the node
    # cache keys entries by: code inside a template, a loop or an output node counts.
    assert old in document
    before, again = fingerprint(document), fingerprint(document)
    after = fingerprint(document.replace(old, new))
    assert before == again
    changed = {part for part in before if before[part] != after.get(part)}
    assert changed == {f"node {node!r}"}
