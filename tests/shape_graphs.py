"""Generated workflow documents of the shapes the docs allow (not a test module).

``graphs(prefix)`` is a hypothesis strategy of YAML workflow documents
(dicts) built from blocks: a plain node; a static fan-out (1 to 3 branches)
or a map fan-out (0 to 3 items) whose branches are sequences of blocks
themselves; a conditional fork whose arms may start with a fan-out; a
bounded loop whose body may start with a fan-out. A fan-out or a fork may
start at the node before it — often a fan-in node, so fan-in nodes fan out
again or route by conditions — and a loop may turn back at its body's
last node (again, often a fan-in node). Branches end at their fan-in node, at ``__end__`` or at a node with no
edge; a few nodes raise, so failed branches occur too.

Every node appends its name to ``trace`` and counts its runs in
``n_<name>`` (loops and forks decide by those counts); a map's source
writes the list it maps over, and a fan-in node records what each branch
left in ``got_<name>``. ``batch`` joins several documents into one, whose
first node routes by ``state['case']``, so one compiled graph (one worker
pool) runs them all.

Draws that shrink to 0 give the simplest shape, so a failing graph
shrinks towards a short chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from hypothesis import strategies as st

START = "__start__"
END = "__end__"
# Fan-outs nest at most this deep, and sequences, forks and loops inside them too.
MAX_LEVEL = 3

# The block kinds, by the integer drawn (0 is the simplest).
NODE, STATIC, MAP, FORK, LOOP = range(5)


@dataclass
class _Node:
    name: str
    fan_in: bool = False
    items: int | None = None  # a map's source: how many items it writes
    fails_when: str | None = None


@dataclass
class _Builder:
    draw: Any
    prefix: str
    nodes: list[_Node] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)

    def node(self, role: str, *, fan_in: bool = False) -> _Node:
        node = _Node(f"{self.prefix}{role}{len(self.nodes)}", fan_in=fan_in)
        # Rare failures: on a branch's second item, or at some lengths of the trace.
        failure = self.draw(st.integers(0, 15))
        node.fails_when = {14: "state.get('index') == 1",
                           15: "len(state.get('trace', [])) % 4 == 3"}.get(failure)
        self.nodes.append(node)
        return node

    def edge(self, source: str, target: str, **more: Any) -> None:
        self.edges.append({"from": source, "to": target, **more})

    def sequence(self, level: int) -> tuple[str, str, bool]:
        """Blocks in a row: (entry node, exit node, whether the exit has no edge yet)."""
        entry = exit_ = None
        free = False
        for _ in range(self.draw(st.integers(1, 3 if level < 2 else 2))):
            kind = self.draw(st.integers(0, 4 if level < MAX_LEVEL else 0))
            source = None
            if kind in (STATIC, MAP, FORK) and free and self.draw(st.integers(0, 3)) > 0:
                # The block before ends in this node (often a fan-in node): it
                # fans out, or routes by conditions, itself.
                source = exit_
            block_entry, block_exit, block_free = self.block(kind, level, source)
            if entry is None:
                entry = block_entry
            elif source is None:
                self.edge(exit_, block_entry)
            exit_, free = block_exit, block_free
        assert entry is not None and exit_ is not None
        return entry, exit_, free

    def block(self, kind: int, level: int, source: str | None) -> tuple[str, str, bool]:
        if kind == NODE:
            name = self.node("n").name
            return name, name, True
        if kind in (STATIC, MAP):
            return self.fan_out(kind, level, source)
        if kind == FORK:
            return self.fork(level, source)
        return self.loop(level)

    def fan_out(self, kind: int, level: int, source: str | None) -> tuple[str, str, bool]:
        start = source or self.node("s").name
        fan_in = self.node("f", fan_in=True)
        if kind == STATIC:
            for _ in range(self.draw(st.integers(1, 3))):
                entry = self.branch(level, fan_in.name)
                self.edge(start, entry, type="parallel", fan_in=fan_in.name)
        else:
            next(node for node in self.nodes if node.name == start).items = \
                self.draw(st.integers(0, 3))
            edge: dict[str, Any] = {"type": "map", "fan_in": fan_in.name}
            over = self.draw(st.integers(0, 2))
            edge["over"] = f"items_{start}" if over < 2 else {"python": f"state['items_{start}']"}
            if over == 1:
                edge.update({"as": f"it_{start}", "index_as": f"ix_{start}"})
            concurrency = self.draw(st.integers(0, 2))
            if concurrency:
                edge["max_concurrency"] = concurrency
            self.edge(start, self.branch(level, fan_in.name), **edge)
        return start, fan_in.name, True

    def branch(self, level: int, fan_in: str) -> str:
        entry, exit_, _ = self.sequence(level + 1)
        ending = self.draw(st.integers(0, 5))
        if ending < 4:
            self.edge(exit_, fan_in)
        elif ending == 4:
            self.edge(exit_, END)
        # else no edge: the branch ends at its last node, or, when that is a
        # loop's check node, fails with a routing error once the loop is done.
        return entry

    def fork(self, level: int, source: str | None) -> tuple[str, str, bool]:
        decider = source or self.node("d").name
        join = self.node("j").name
        condition = self.draw(st.sampled_from([
            f"state['n_{decider}'] % 2 == 1",
            "len(state['trace']) % 2 == 0",
            "state.get('index', 0) % 2 == 0",
        ]))
        taken, _, _ = self.arm(level, join)
        self.edge(decider, taken, when=condition)
        if self.draw(st.booleans()):
            other, _, _ = self.arm(level, join)
            self.edge(decider, other)
        else:
            self.edge(decider, join)
        return decider, join, True

    def arm(self, level: int, join: str) -> tuple[str, str, bool]:
        entry, exit_, free = self.sequence(level + 1)
        self.edge(exit_, join)
        return entry, exit_, free

    def loop(self, level: int) -> tuple[str, str, bool]:
        entry, exit_, free = self.sequence(level + 1)
        if free and self.draw(st.booleans()):
            check = exit_  # the body's last node (a fan-in node, say) loops back itself
        else:
            check = self.node("c").name
            self.edge(exit_, check)
        rounds = self.draw(st.integers(1, 3))
        self.edge(check, entry, when=f"state['n_{check}'] < {rounds}")
        return entry, check, False


def _body(node: _Node) -> str:
    name = node.name
    lines = []
    if node.fails_when is not None:
        lines += [f"if {node.fails_when}:", f"    raise RuntimeError('{name} fails')"]
    update = [f"'trace': state.get('trace', []) + [{name!r}]",
              f"'n_{name}': state.get('n_{name}', 0) + 1"]
    if node.items is not None:
        update.append(f"'items_{name}': ['{name}.' + str(state.get('n_{name}', 0)) + '.' + str(i)"
                      f" for i in range({node.items})]")
    if node.fan_in:
        # What each branch left, without earlier fan-ins' records (kept small).
        update.append(f"'got_{name}': [\n"
                      "        [r.branch, r.index, r.success, sorted(r.state),\n"
                      "         {k: v for k, v in r.state.items() if not k.startswith('got_')}]\n"
                      "        for r in parallel_results]")
    lines += ["return {", *(f"    {part}," for part in update), "}"]
    return "\n".join(lines) + "\n"


def _document(builder: _Builder, entry: str) -> dict:
    nodes = []
    for node in builder.nodes:
        spec = {"name": node.name, "run": _body(node)}
        if node.fan_in:
            spec["fan_in"] = True
        nodes.append(spec)
    return {"name": f"{builder.prefix}generated",
            "settings": {"parallel": {"fail_fast": False}},
            "nodes": nodes, "edges": [{"from": START, "to": entry}, *builder.edges]}


@st.composite
def graphs(draw: Any, prefix: str = "") -> dict:
    """One generated workflow document; every node name starts with ``prefix``."""
    builder = _Builder(draw, prefix)
    entry, exit_, free = builder.sequence(0)
    if not free or draw(st.booleans()):
        builder.edge(exit_, END)  # else the run ends at a node with no outgoing edge
    return _document(builder, entry)


@st.composite
def batches(draw: Any, min_size: int = 1, max_size: int = 8) -> list[dict]:
    """Several generated documents, with node names that do not clash."""
    size = draw(st.integers(min_size, max_size))
    return [draw(graphs(prefix=f"g{i}_")) for i in range(size)]


def batch(documents: list[dict]) -> dict:
    """One document running ``documents[state['case']]``, so one compiled graph runs them all."""
    nodes: list[dict] = [{"name": "pick", "run": "return None\n"}]
    edges: list[dict] = [{"from": START, "to": "pick"}]
    for case, document in enumerate(documents):
        nodes += document["nodes"]
        for edge in document["edges"]:
            if edge["from"] == START:
                edges.append({"from": "pick", "to": edge["to"], "when": f"state['case'] == {case}"})
            else:
                edges.append(edge)
    return {"name": "generated-batch", "settings": {"parallel": {"fail_fast": False}},
            "nodes": nodes, "edges": edges}


class _Dumper(yaml.SafeDumper):
    """Writes node bodies as literal blocks, as a person would."""


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text)


def to_yaml(document: dict) -> str:
    """``document`` as a YAML file ``isobranch run`` takes."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


def shapes_of(document: dict) -> set[str]:
    """The notable shapes in a generated ``document``, so a test can check the generator
    still makes each of them. Reads only the document (node order is creation order:
    an edge with a condition to an earlier node is a loop's back edge)."""
    order = {node["name"]: i for i, node in enumerate(document["nodes"])}
    fan_ins = {node["name"] for node in document["nodes"] if node.get("fan_in")}
    fan_outs = {edge["from"]: edge for edge in document["edges"]
                if edge.get("type") in ("parallel", "map")}
    main = _main_path(document)
    shapes = set()
    for source, edge in fan_outs.items():
        kind = edge["type"]
        if source in fan_ins:
            shapes.add(f"a fan-in node with a {kind} edge")
            if source not in main:
                shapes.add("a fan-in node that fans out in a branch")
        if source not in main:
            shapes.add(f"a nested {kind} fan-out")
        if kind == "map":
            shapes.add("a map over an expression" if isinstance(edge["over"], dict)
                       else "a map over a key")
            shapes.update({"a map with as and index_as"} if "as" in edge else set())
    for edge in document["edges"]:
        if "when" not in edge or edge["to"] not in order:
            continue
        back = order[edge["to"]] <= order[edge["from"]]
        if edge["to"] in fan_outs:
            shapes.add("a loop back into a fan-out" if back else "a conditional edge into a fan-out")
        if back and edge["from"] in fan_ins:
            shapes.add("a loop turning back at a fan-in node")
        if not back and edge["from"] in fan_ins:
            shapes.add("a fan-in node routing by conditions")
    if any(edge["to"] == END and edge["from"] not in main for edge in document["edges"]):
        shapes.add("a branch ending at __end__")
    bodies = [node["run"] for node in document["nodes"]]
    if any("for i in range(0)]" in body for body in bodies):
        shapes.add("an empty map")
    if any("raise RuntimeError" in body for body in bodies):
        shapes.add("a node that fails")
    return shapes


def _main_path(document: dict) -> set[str]:
    """The nodes the main path may run: from the entry along edges, past each fan-out to its
    fan-in node (branches run elsewhere)."""
    edges: dict[str, list[str]] = {}
    for edge in document["edges"]:
        target = edge["fan_in"] if edge.get("type") in ("parallel", "map") else edge["to"]
        edges.setdefault(edge["from"], []).append(target)
    seen: set[str] = set()
    todo = list(edges.get(START, []))
    while todo:
        node = todo.pop()
        if node not in seen and node != END:
            seen.add(node)
            todo.extend(edges.get(node, []))
    return seen
