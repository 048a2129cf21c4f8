"""Mermaid and DOT text of compiled graphs (drawing.py): shapes, edges, escaping.

The pure text only; rendering through Graphviz is tests/test_pictures.py.
"""

from __future__ import annotations

import itertools
import re

import pytest

from isobranch import END, START, StateGraph
from isobranch.conditions import LuaCondition
from isobranch.drawing import describe, dot_quote, dot_text, mermaid_escape


def noop(state):
    return {}


def join(state, parallel_results):
    return {}


@pytest.fixture
def compiled():
    """Compile a StateGraph inline; closed afterwards."""
    graphs = []

    def _compile(graph: StateGraph):
        app = graph.compile(isolation="inline")
        graphs.append(app)
        return app

    yield _compile
    for app in graphs:
        app.close()


def graph_with(*nodes: str, fan_ins: tuple[str, ...] = ()) -> StateGraph:
    graph = StateGraph()
    for name in nodes:
        graph.add_node(name, noop)
    for name in fan_ins:
        graph.add_fan_in_node(name, join)
    return graph


def mermaid_lines(app) -> list[str]:
    return app.draw_mermaid().splitlines()


def test_static_fan_out_marks_the_fan_in_in_both_formats(compiled):
    graph = graph_with("split", "a", "b", fan_ins=("join",))
    graph.add_edge(START, "split")
    graph.add_parallel_edge("split", "a", fan_in="join")
    graph.add_parallel_edge("split", "b", fan_in="join")
    graph.add_edge("a", "join").add_edge("b", "join").add_edge("join", END)
    app = compiled(graph)
    assert mermaid_lines(app) == [
        "flowchart TD",
        '    n___start__["__start__"] --> n_split["split"]',
        '    n_split["split"] -->|"parallel, fan-in join"| n_a["a"]',
        '    n_split["split"] -->|"parallel, fan-in join"| n_b["b"]',
        '    n_a["a"] --> n_join[["join"]]',
        '    n_b["b"] --> n_join[["join"]]',
        '    n_join[["join"]] --> n___end__["__end__"]',
    ]
    dot = app.draw_dot().splitlines()
    assert '    n_join [label="join", style="", peripheries=2];' in dot
    assert '    n_a [label="a"];' in dot
    assert '    n___start__ [label="__start__", shape=oval, style=""];' in dot
    assert '    n_split -> n_a [label="parallel, fan-in join"];' in dot
    assert '    n_join -> n___end__;' in dot
    assert dot[0] == "digraph isobranch {" and dot[-1] == "}"


def test_map_edges_are_dotted_and_labelled_with_over(compiled):
    graph = graph_with("split", "score", "rank", "weigh", fan_ins=("collect",))
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "score", over="docs", item_key="doc", fan_in="collect")
    graph.add_map_edge("score", "rank", over=LuaCondition("state.pages"), fan_in="collect")
    graph.add_map_edge("rank", "weigh", over=lambda state: state["w"], fan_in="collect")
    graph.add_edge("weigh", "collect").add_edge("collect", END)
    app = compiled(graph)
    lines = mermaid_lines(app)
    assert '    n_split["split"] -. "map over docs as doc, fan-in collect" .-> ' \
           'n_score["score"]' in lines
    assert '    n_score["score"] -. "map over lua: state.pages as item, fan-in collect" .-> ' \
           'n_rank["rank"]' in lines
    assert '    n_rank["rank"] -. "map over callable #60;lambda#62; as item, fan-in collect" .-> ' \
           'n_weigh["weigh"]' in lines
    dot = app.draw_dot().splitlines()
    assert '    n_split -> n_score [label="map over docs as doc, fan-in collect", ' \
           'style=dotted];' in dot
    assert '    n_rank -> n_weigh [label="map over callable <lambda> as item, ' \
           'fan-in collect", style=dotted];' in dot


def test_conditional_edges_in_the_order_tried_then_the_default(compiled):
    graph = graph_with("check", "high", "mid", "low")
    graph.add_edge(START, "check")
    graph.add_edge("check", "low")  # the default, declared first, is tried last
    graph.add_edge("check", "high", when="state['n'] > 9")
    graph.add_edge("check", "mid", when=LuaCondition("state.n > 4"))
    app = compiled(graph)
    assert mermaid_lines(app)[2:5] == [
        '    n_check["check"] -->|"python: state[\'n\'] #62; 9"| n_high["high"]',
        '    n_check["check"] -->|"lua: state.n #62; 4"| n_mid["mid"]',
        '    n_check["check"] --> n_low["low"]',
    ]
    dot = app.draw_dot().splitlines()
    edges = [line for line in dot if line.startswith("    n_check ->")]
    assert edges == ['    n_check -> n_high [label="python: state[\'n\'] > 9"];',
                     '    n_check -> n_mid [label="lua: state.n > 4"];',
                     '    n_check -> n_low;']


def test_routers_with_and_without_a_mapping(compiled):
    graph = graph_with("pick", "yes", "no", "choose")
    graph.add_edge(START, "pick")
    graph.add_conditional_edges("pick", lambda state: state["ok"], {True: "yes", False: "choose"})
    graph.add_edge("yes", END)

    def next_step(state):
        return "no"

    graph.add_conditional_edges("choose", next_step)
    app = compiled(graph)
    lines = mermaid_lines(app)
    assert '    n_pick["pick"] -->|"True"| n_yes["yes"]' in lines
    assert '    n_pick["pick"] -->|"False"| n_choose["choose"]' in lines
    # Where a router without a mapping goes is known only at run time.
    assert '    n_choose["choose"] -->|"router next_step"| n_choose__choice{{"any node"}}' \
        in lines
    assert '    n_choose__choice [label="any node", shape=note, style=""];' \
        in app.draw_dot().splitlines()


def test_a_loop_is_an_edge_back_and_end_is_drawn_once(compiled):
    graph = graph_with("draft", "review")
    graph.add_edge(START, "draft").add_edge("draft", "review")
    graph.add_edge("review", "draft", when="not state.get('ok')")
    graph.add_edge("review", END)
    app = compiled(graph)
    assert mermaid_lines(app)[1:] == [
        '    n___start__["__start__"] --> n_draft["draft"]',
        '    n_draft["draft"] --> n_review["review"]',
        '    n_review["review"] -->|"python: not state.get(\'ok\')"| n_draft["draft"]',
        '    n_review["review"] --> n___end__["__end__"]',
    ]
    dot = app.draw_dot().splitlines()
    assert '    n_review -> n_draft [label="python: not state.get(\'ok\')"];' in dot
    assert sum(line.startswith("    n___end__ [") for line in dot) == 1


def test_a_fan_in_that_fans_out_is_marked_and_has_its_parallel_edges(compiled):
    graph = graph_with("split", "a", "b", "c", "d", fan_ins=("middle", "last"))
    graph.add_edge(START, "split")
    graph.add_parallel_edge("split", "a", fan_in="middle")
    graph.add_parallel_edge("split", "b", fan_in="middle")
    graph.add_edge("a", "middle").add_edge("b", "middle")
    graph.add_parallel_edge("middle", "c", fan_in="last")
    graph.add_parallel_edge("middle", "d", fan_in="last")
    graph.add_edge("c", "last").add_edge("d", "last").add_edge("last", END)
    app = compiled(graph)
    lines = mermaid_lines(app)
    assert '    n_middle[["middle"]] -->|"parallel, fan-in last"| n_c["c"]' in lines
    assert '    n_middle[["middle"]] -->|"parallel, fan-in last"| n_d["d"]' in lines
    assert '    n_d["d"] --> n_last[["last"]]' in lines
    # The fan-out source routes nowhere itself (routing continues at its fan-in).
    assert not any(line.startswith('    n_middle[["middle"]] --> ') for line in lines)
    dot = app.draw_dot().splitlines()
    assert '    n_middle [label="middle", style="", peripheries=2];' in dot
    assert '    n_last [label="last", style="", peripheries=2];' in dot


def test_a_node_without_edges_ends_the_run_and_is_drawn_so(compiled):
    graph = graph_with("only")
    graph.add_edge(START, "only")
    app = compiled(graph)
    assert mermaid_lines(app)[-1] == '    n_only["only"] --> n___end__["__end__"]'
    assert app.invoke({}) == {}  # the runner agrees: it ended there


def test_the_graph_name_is_the_digraph_title():
    graph = graph_with("a")
    graph.add_edge(START, "a")
    app = graph.compile(isolation="inline", name='my "agent"')
    try:
        assert app.draw_dot().splitlines()[0] == 'digraph "my \\"agent\\"" {'
    finally:
        app.close()


# -- escaping: any name draws, and reads back as itself -------------------------

NASTY_NAMES = [
    "a b", 'say "hi"', "café 名前", "x --> y", "a_b", "a-b", "a.b", "pipe|bar",
    "hash #quot; #35;", "<b>bold</b>", "`tick`", "back\\slash \\N \\G \\l", "line\nbreak",
    "end", "graph", "subgraph", "[brackets]", "{braces}", "(paren)", "semi;colon",
    "tab\there", "n_a_b_2", "π∑",
]
# What a label shows: tabs and other control characters as spaces, line breaks kept.
SHOWN = {name: name.replace("\t", " ") for name in NASTY_NAMES}


@pytest.fixture
def nasty(compiled):
    """A chain through every nasty name, each edge also conditional on that name."""
    graph = graph_with(*NASTY_NAMES)
    graph.add_edge(START, NASTY_NAMES[0])
    for source, target in itertools.pairwise(NASTY_NAMES):
        graph.add_edge(source, target, when=f"state.get({target!r})")
        graph.add_edge(source, target)
    graph.add_edge(NASTY_NAMES[-1], END)
    return compiled(graph)


MERMAID_NODE = r'(n_\w+)(\[\["|\["|\{\{")([^"]*)("\]\]|"\]|"\}\})'
MERMAID_EDGE = re.compile(
    rf'    {MERMAID_NODE}( --> | -->\|"(?P<label>[^"]*)"\| | -\. "(?P<map>[^"]*)" \.-> )'
    rf'{MERMAID_NODE}')
PAIRED = {'["': '"]', '[["': '"]]', '{{"': '"}}'}


def mermaid_unescape(text: str) -> str:
    text = text.replace("<br>", "\n")
    return re.sub(r"#(quot|\d+);",
                  lambda m: '"' if m.group(1) == "quot" else chr(int(m.group(1))), text)


def test_mermaid_names_are_quoted_escaped_and_read_back(nasty):
    ids: dict[str, str] = {}
    conditions = []
    for line in nasty.draw_mermaid().splitlines()[1:]:
        match = MERMAID_EDGE.fullmatch(line)
        assert match, f"not one Mermaid edge: {line!r}"
        groups = match.groups()
        for node_id, opening, label, closing in (groups[0:4], groups[7:11]):
            assert PAIRED[opening] == closing
            # HTML, an arrow, a pipe, Markdown: none may reach Mermaid unescaped.
            assert not re.search(r"[<>|`]", label.replace("<br>", "")), label
            name = mermaid_unescape(label)
            assert ids.setdefault(node_id, name) == name, f"{node_id} names two nodes"
        assert not re.search(r"[<>|`]", (match["label"] or "").replace("<br>", ""))
        if match["label"]:
            conditions.append(mermaid_unescape(match["label"]))
    assert sorted(ids.values()) == sorted([*SHOWN.values(), START, END])
    assert len(set(ids)) == len(ids)  # one identifier per name, none shared
    assert all(re.fullmatch(r"n_[A-Za-z0-9_]+", node_id) for node_id in ids)
    assert conditions == [f"python: state.get({name!r})" for name in NASTY_NAMES[1:]]


DOT_STRING = r'"((?:[^"\\\n]|\\.)*)"'


def dot_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def test_dot_names_are_quoted_escaped_and_read_back(nasty):
    lines = nasty.draw_dot().splitlines()
    labels = {}
    for line in lines:
        node = re.fullmatch(rf"    (n_\w+) \[label={DOT_STRING}(, .*)?\];", line)
        if node:
            labels[node.group(1)] = dot_unescape(node.group(2))
    assert sorted(labels.values()) == sorted([*SHOWN.values(), START, END])
    edge_labels = [dot_unescape(m.group(1)) for line in lines
                   if (m := re.fullmatch(rf"    n_\w+ -> n_\w+ \[label={DOT_STRING}\];", line))]
    assert edge_labels == [f"python: state.get({name!r})" for name in NASTY_NAMES[1:]]
    # Every other line is a fixed part of the digraph: nothing leaked out of a string.
    others = [line for line in lines if not re.fullmatch(
        rf"    (n_\w+ \[label={DOT_STRING}(, .*)?\]|n_\w+ -> n_\w+( \[label={DOT_STRING}\])?);",
        line)]
    assert others == [lines[0], lines[1], lines[2], lines[3], "}"]


def test_control_characters_become_spaces_and_line_breaks_stay():
    assert mermaid_escape("a\r\nb\rc\x00d\x1be") == "a<br>b<br>c d e"
    assert dot_quote("a\r\nb\x07c") == '"a\\nb c"'


def test_describe_lists_end_only_when_something_reaches_it(compiled):
    graph = graph_with("a", "b")
    graph.add_edge(START, "a")
    graph.add_conditional_edges("a", lambda state: "b", {"b": "b"})
    graph.add_edge("b", "a")
    drawing = describe(compiled(graph))
    assert [node.label for node in drawing.nodes] == [START, "a", "b"]
    assert "__end__" not in dot_text(drawing)


def review_graph() -> StateGraph:
    """An inner graph with a fan-out of its own, and a nested subgraph node ``deep``."""
    deep = graph_with("leaf")
    deep.add_edge(START, "leaf").add_edge("leaf", END)
    inner = graph_with("split", "a", "b", fan_ins=("join",))
    inner.add_node("deep", deep)
    inner.add_edge(START, "split")
    inner.add_parallel_edge("split", "a", fan_in="join")
    inner.add_parallel_edge("split", "b", fan_in="join")
    inner.add_edge("a", "join").add_edge("b", "join").add_edge("join", "deep")
    inner.add_edge("deep", END)
    return inner


def test_a_subgraph_node_is_a_mermaid_subgraph_block_holding_its_inner_graph(compiled):
    graph = graph_with("before", "after")
    graph.add_node("review", review_graph(), output={"x": "x"})
    graph.add_edge(START, "before").add_edge("before", "review").add_edge("review", "after")
    graph.add_edge("after", END)
    assert mermaid_lines(compiled(graph)) == [
        "flowchart TD",
        '    subgraph n_review__cluster ["review"]',
        '        subgraph n_review__deep__cluster ["deep"]',
        '            n_review__deep____start__["__start__"] --> n_review__deep__leaf["leaf"]',
        '            n_review__deep__leaf["leaf"] --> n_review__deep____end__["__end__"]',
        "        end",
        '        n_review____start__["__start__"] --> n_review__split["split"]',
        '        n_review__split["split"] -->|"parallel, fan-in join"| n_review__a["a"]',
        '        n_review__split["split"] -->|"parallel, fan-in join"| n_review__b["b"]',
        '        n_review__a["a"] --> n_review__join[["join"]]',
        '        n_review__b["b"] --> n_review__join[["join"]]',
        # Into and out of a nested subgraph node: its inner START and END.
        '        n_review__join[["join"]] --> n_review__deep____start__["__start__"]',
        '        n_review__deep____end__["__end__"] --> n_review____end__["__end__"]',
        "    end",
        '    n___start__["__start__"] --> n_before["before"]',
        '    n_before["before"] --> n_review____start__["__start__"]',
        '    n_after["after"] --> n___end__["__end__"]',
        '    n_review____end__["__end__"] --> n_after["after"]',
    ]


def test_a_subgraph_node_is_a_dot_cluster_labelled_with_its_name(compiled):
    graph = StateGraph()
    graph.add_node("review", review_graph())
    graph.add_edge(START, "review").add_edge("review", END)
    dot = compiled(graph).draw_dot().splitlines()
    start = dot.index("    subgraph cluster_n_review__cluster {")
    assert dot[start + 1] == '        label="review";'
    assert '            label="deep";' in dot
    assert '        n_review__split [label="split"];' in dot
    assert '            n_review__deep__leaf [label="leaf"];' in dot
    assert "    n___start__ -> n_review____start__;" in dot
    assert "    n_review____end__ -> n___end__;" in dot
    # Every block that opens closes: the digraph, two clusters.
    assert sum(line.endswith("{") for line in dot) == 3
    assert sum(line.strip() == "}" for line in dot) == 3


def test_identifiers_stay_unique_across_the_levels_of_subgraphs(compiled):
    # An outer node whose name spells an inner node's identifier.
    inner = graph_with("x")
    inner.add_edge(START, "x").add_edge("x", END)
    graph = graph_with("s__x")
    graph.add_node("s", inner)
    graph.add_edge(START, "s").add_edge("s", "s__x").add_edge("s__x", END)
    drawing = describe(compiled(graph))
    ids = [node.id for node in drawing.nodes]
    [cluster] = [node for node in drawing.nodes if node.inner is not None]
    inner_ids = [node.id for node in cluster.inner.nodes]
    assert len(set(ids + inner_ids)) == len(ids + inner_ids)
