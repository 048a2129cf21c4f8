"""A reference interpreter of the workflow semantics, for differential tests (not a test module).

It runs a YAML workflow document (as a dict) the slowest, plainest way
there is, written from the rules of docs/yaml.md and docs/map.md and
sharing no code with the engine:

- a node's returned dict is merged into the state (a shallow update);
- routing: conditional edges in the order written, the first that holds;
  else the unconditional edge; else, when conditions exist, a failure;
  else the run (or branch) ends;
- any node that runs and has a fan-out fans out, whatever reached it —
  an edge, a loop, or the end of another fan-out (a fan-in node);
- a static fan-out runs one branch per parallel edge, in declaration
  order, each on a deep copy of the state after the fan-out node; a map
  fan-out one branch per item, on a deep copy of the state without the
  ``over`` key (when it is a key) plus ``as`` and ``index_as``;
- a branch runs from its first node until its fan-in node (not run) or
  END; a node that raises ends the branch as a failed result carrying
  the state before that node; on the main path it fails the run;
- the fan-in node then runs once on the state from before the fan-out,
  with the results in declaration / item order, and the path continues
  from it (a fan-in node may fan out in turn).

Branches run one after another in this process: isolation here is only
the deep copies. Only Python nodes and Python conditions are supported.
"""

from __future__ import annotations

import builtins
import copy
import textwrap
from dataclasses import dataclass
from typing import Any

START = "__start__"
END = "__end__"
# A guard against a generated graph that loops: far above any that terminates.
MAX_STEPS = 10_000


@dataclass(frozen=True)
class BranchOutcome:
    """What a fan-in node sees of one branch (the fields a ``ParallelFlowResult`` has too)."""

    branch: str
    index: int | None
    state: dict
    success: bool
    error: str | None = None


class ReferenceFailure(Exception):
    """A node raised, or routing found no edge: the run (or branch) fails at ``node``."""

    def __init__(self, node: str, error_type: str, state: dict) -> None:
        super().__init__(f"node {node!r}: {error_type}")
        self.node = node
        self.error_type = error_type
        self.state = state


@dataclass(frozen=True)
class _Static:
    targets: tuple[str, ...]
    fan_in: str


@dataclass(frozen=True)
class _Map:
    target: str
    fan_in: str
    over: str | dict
    item_key: str
    index_key: str


class ReferenceGraph:
    """A workflow document, run by ``run(state)`` into its final state (or ``ReferenceFailure``)."""

    def __init__(self, document: dict) -> None:
        self._code = {node["name"]: _function(node["name"], node["run"])
                      for node in document["nodes"]}
        self._routes: dict[str, list[tuple[str | None, str]]] = {}
        self._fan_outs: dict[str, _Static | _Map] = {}
        self.entry = document["nodes"][0]["name"]
        for edge in document.get("edges", []):
            source, target, kind = edge["from"], edge["to"], edge.get("type", "normal")
            if source == START:
                self.entry = target
            elif kind == "parallel":
                known = self._fan_outs.get(source)
                targets = known.targets if isinstance(known, _Static) else ()
                self._fan_outs[source] = _Static((*targets, target), edge["fan_in"])
            elif kind == "map":
                self._fan_outs[source] = _Map(target, edge["fan_in"], edge["over"],
                                              edge.get("as", "item"), edge.get("index_as", "index"))
            else:
                when = edge.get("when")
                if isinstance(when, dict):
                    when = when["python"]  # a {lua: ...} condition is not supported here
                self._routes.setdefault(source, []).append((when, target))

    def run(self, state: dict) -> dict:
        """The final state of a run from ``state`` (not changed); ``ReferenceFailure`` if it fails."""
        state = copy.deepcopy(state)
        self._path(state, self.entry, stop_at=None)
        return state

    def _path(self, state: dict, node: str, stop_at: str | None) -> None:
        steps = 0
        while node not in (END, stop_at):
            steps += 1
            assert steps < MAX_STEPS, "the reference stopped a graph that loops"
            self._run_node(node, state, None)
            while node in self._fan_outs:
                fan_out = self._fan_outs[node]
                results = self._branches(node, fan_out, state)
                node = fan_out.fan_in
                self._run_node(node, state, results)
            node = self._next(node, state)

    def _branches(self, node: str, fan_out: _Static | _Map, state: dict) -> list[BranchOutcome]:
        if isinstance(fan_out, _Static):
            inputs = [(target, target, None, copy.deepcopy(state)) for target in fan_out.targets]
        else:
            if isinstance(fan_out.over, str):
                items = state[fan_out.over]
                base = {key: value for key, value in state.items() if key != fan_out.over}
            else:
                items = self._evaluate(fan_out.over["python"], state)
                base = state
            assert isinstance(items, (list, tuple)), f"map over {fan_out.over!r} at {node!r}"
            inputs = [(fan_out.target, f"{fan_out.target}[{i}]", i,
                       {**copy.deepcopy(base), fan_out.item_key: copy.deepcopy(item),
                        fan_out.index_key: i})
                      for i, item in enumerate(items)]
        results = []
        for start, name, index, branch_state in inputs:
            try:
                self._path(branch_state, start, stop_at=fan_out.fan_in)
            except ReferenceFailure as failure:
                results.append(BranchOutcome(name, index, failure.state, False, str(failure)))
            else:
                results.append(BranchOutcome(name, index, branch_state, True))
        return results

    def _run_node(self, node: str, state: dict, results: list[BranchOutcome] | None) -> None:
        try:
            update = self._code[node](state, {}, results)
        except Exception as exc:
            raise ReferenceFailure(node, type(exc).__name__, dict(state)) from exc
        if update is not None:
            assert isinstance(update, dict), f"node {node!r} returned {update!r}"
            state.update(update)

    def _next(self, node: str, state: dict) -> str:
        routes = self._routes.get(node, [])
        for when, target in routes:
            if when is None:
                continue
            try:
                holds = self._evaluate(when, state)
            except Exception as exc:
                raise ReferenceFailure(node, type(exc).__name__, dict(state)) from exc
            if holds:
                return target
        for when, target in routes:
            if when is None:
                return target
        if routes:
            raise ReferenceFailure(node, "RoutingError", dict(state))
        return END

    @staticmethod
    def _evaluate(expression: str, state: dict) -> Any:
        return eval(expression, {"__builtins__": builtins}, {"state": state, "variables": {}})


def _function(name: str, body: str) -> Any:
    source = "def node(state, variables, parallel_results):\n" + textwrap.indent(body, "    ")
    namespace: dict[str, Any] = {"__builtins__": builtins}
    exec(compile(source, f"<reference node {name}>", "exec"), namespace)
    return namespace["node"]
