"""StateGraph: building and validating a graph; ``compile`` freezes it into a ``CompiledGraph``.

The runnable graph itself lives in compiled.py.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .cache import CachePolicy, as_cache_policy
from .cache_store import SqliteCache
from .checkpoint.fingerprint import node_fingerprint
from .checkpoint.store import SqliteCheckpointer
from .compiled import CompiledGraph
from .conditions import Condition, Expression, as_condition
from .defaults import (
    DEFAULT_FAIL_FAST,
    DEFAULT_ISOLATION,
    DEFAULT_LUA_MAX_MEMORY,
    DEFAULT_LUA_TIMEOUT,
    DEFAULT_MAX_STEPS,
)
from .errors import GraphError
from .fanout import FanOut, MapFanOut, StaticFanOut
from .isolation import memory_limit
from .isolation.registry import available_backends, create_backend
from .isolation.registry import backend_options as declared_backend_options
from .keys import unknown
from .node_memo import CachedNode, NodeMemos
from .nodes import Node, as_node
from .retry import RetryPolicy, as_policy
from .routes import END, START, Routes
from .run import limit_problems
from .schema import StateSchema
from .subgraph import SubgraphNode, mapping_problems


class StateGraph:
    """A graph of nodes over a dict state, built in Python.

    Nodes are callables ``fn(state) -> dict | None`` (fan-in nodes:
    ``fn(state, parallel_results)``) or ``Node`` objects. ``compile``
    validates everything and returns a ``CompiledGraph``.
    """

    def __init__(self, state_schema: Any = None) -> None:
        """``state_schema``: a ``TypedDict`` (fields may be ``Annotated[T, reducer]``), a dict
        ``{key: reducer | type}``, or None; see docs/state.md. Invalid: ``GraphError``."""
        self.state_schema = state_schema
        self.schema = StateSchema.from_python(state_schema)
        self._nodes: dict[str, Node] = {}
        self._node_retries: dict[str, RetryPolicy] = {}
        self._node_caches: dict[str, CachePolicy] = {}
        self._replayed: set[str] = set()
        self._fan_in_nodes: set[str] = set()
        self._edges: list[tuple[str, str, Condition | None]] = []
        self._routers: dict[str, tuple[Callable[[dict], Any], dict[Any, str] | None]] = {}
        self._parallel: list[tuple[str, str, str, RetryPolicy | None]] = []
        self._maps: list[MapFanOut] = []
        self._map_sources: list[str] = []
        self._entry: str | None = None
        self._finish: set[str] = set()

    def add_node(self, name: str, fn: Callable[..., Any] | Node | StateGraph | CompiledGraph, *,
                 input: Mapping[str, str] | None = None, output: Mapping[str, str] | None = None,
                 retry: RetryPolicy | Mapping[str, Any] | int | None = None,
                 cache: CachePolicy | Mapping[str, Any] | bool | None = None,
                 replay: bool = False) -> StateGraph:
        """Add a node; ``fn`` is a callable of ``state``, a ``Node``, or a graph.

        A graph (a ``StateGraph``, compiled when this graph compiles, or a
        ``CompiledGraph``) makes a subgraph node: it runs the inner graph
        from its START to its END as one step. ``input`` (``{inner key:
        outer key}``) picks and renames what the inner run starts from
        (default: a private copy of the whole state); ``output`` (``{outer
        key: inner key}``) picks and renames what it writes back (default:
        the whole inner final state). ``retry`` (a ``RetryPolicy``, a
        mapping of its fields, or a number of attempts) calls a node that
        raised again, on the same input state (a subgraph from its START).
        ``cache`` (a ``CachePolicy``, ``True``, or a mapping of its fields)
        returns the update stored for the same input instead of running the
        node, once the graph is compiled with ``cache=SqliteCache(path)``
        (docs/cache.md). ``replay=True`` marks a recorded node: given a
        tape (``config={"replay": tape}``, the pytest plugin) it returns its
        recorded update and never runs (docs/regression-testing.md).
        """
        policy = _policy(retry, f"node {name!r}: retry")
        try:
            cache_policy = as_cache_policy(cache, f"node {name!r}: cache")
        except ValueError as exc:
            raise GraphError(str(exc)) from None
        if not isinstance(replay, bool):
            raise GraphError(f"node {name!r}: replay must be True or False, got {replay!r}")
        if not isinstance(name, str) or not name:
            raise GraphError(f"node name must be a non-empty string, got {name!r}")
        if name in (START, END):
            raise GraphError(f"node name {name!r} is reserved")
        if name in self._nodes:
            raise GraphError(f"node {name!r} is defined twice")
        if isinstance(fn, (StateGraph, CompiledGraph)):
            problems = mapping_problems(name, input, output, list(fn.schema.fields))
            if problems:
                raise GraphError(problems=problems)
            self._nodes[name] = SubgraphNode(name, fn, input=input, output=output)
        elif input is not None or output is not None:
            raise GraphError(f"node {name!r}: input= and output= are for subgraph nodes (a "
                             f"StateGraph or CompiledGraph), not a {type(fn).__name__}")
        else:
            try:
                self._nodes[name] = as_node(name, fn)
            except (TypeError, ValueError) as exc:
                raise GraphError(str(exc)) from exc
        if policy is not None:
            self._node_retries[name] = policy
        if cache_policy is not None:
            self._node_caches[name] = cache_policy
        if replay:
            self._replayed.add(name)
        return self

    def add_fan_in_node(self, name: str, fn: Callable[..., Any] | Node, *,
                        retry: RetryPolicy | Mapping[str, Any] | int | None = None,
                        cache: CachePolicy | Mapping[str, Any] | bool | None = None,
                        replay: bool = False) -> StateGraph:
        """Add a fan-in node: it runs once after all branches, with ``parallel_results``.

        It may be recorded (``replay``); a ``cache`` is refused when the graph compiles."""
        return self.add_node(name, fn, retry=retry, cache=cache,
                             replay=replay).mark_fan_in(name)

    def mark_fan_in(self, name: str) -> StateGraph:
        """Declare an already added node as a fan-in node."""
        if name not in self._nodes:
            raise GraphError(f"unknown node {name!r}")
        self._fan_in_nodes.add(name)
        return self

    def add_edge(self, source: str, target: str,
                 when: Condition | Callable[[dict], Any] | str | None = None) -> StateGraph:
        """Add an edge; with ``when`` it is taken only if the condition holds.

        ``add_edge(START, n)`` sets the entry point; a target of ``END``
        finishes the run.
        """
        if source == START:
            if when is not None:
                raise GraphError(f"edge {START} -> {target}: the start edge cannot have a condition")
            self.set_entry_point(target)
            return self
        try:
            condition = as_condition(when) if when is not None else None
        except (TypeError, SyntaxError) as exc:
            raise GraphError(f"edge {source} -> {target}: invalid condition: {exc}") from exc
        self._edges.append((source, target, condition))
        return self

    def add_conditional_edges(self, source: str, router: Callable[[dict], Any],
                              mapping: dict[Any, str] | None = None) -> StateGraph:
        """Route from ``source`` by ``router(state)``: its value (through ``mapping``) names the next node."""
        if source in self._routers:
            raise GraphError(f"node {source!r} already has conditional edges")
        if not callable(router):
            raise GraphError(f"conditional edges from {source!r}: router must be callable")
        self._routers[source] = (router, dict(mapping) if mapping is not None else None)
        return self

    def add_parallel_edge(self, source: str, target: str, fan_in: str, *,
                          retry: RetryPolicy | Mapping[str, Any] | int | None = None
                          ) -> StateGraph:
        """Start ``target`` as a branch after ``source``; branches meet at ``fan_in``.

        ``retry`` runs the branch again from ``target``, on a fresh copy of
        its input, when it fails (default: ``compile(branch_retry=)``).
        """
        where = f"parallel edge {source} -> {target}"
        if not fan_in:
            raise GraphError(f"{where}: fan_in is required")
        self._parallel.append((source, target, fan_in, _policy(retry, f"{where}: retry")))
        return self

    def add_map_edge(self, source: str, target: str, *,
                     over: str | Expression | Callable[[dict], Any], fan_in: str,
                     item_key: str = "item", index_key: str = "index",
                     max_concurrency: int | None = None, retry: Any = None,
                     cancel_unstarted_on_failure: bool = False) -> StateGraph:
        """After ``source``, run one branch from ``target`` per item of ``over``; they meet at ``fan_in``.

        ``over`` is a state key whose value is a list or tuple, or a callable
        ``state -> iterable`` (or an ``Expression``). Branch *i* starts from
        a copy of the state without the ``over`` key (when it is a key), plus
        ``state[item_key] = items[i]`` and ``state[index_key] = i``. The
        fan-in node gets ``parallel_results`` in item order, named
        ``"target[i]"``. ``max_concurrency`` bounds the branches running at
        once. ``retry`` (a ``RetryPolicy``, a mapping of its fields, or a
        number of attempts) runs a failed branch again from ``target`` on a
        fresh copy of its input (default: ``compile(branch_retry=)``).
        With ``cancel_unstarted_on_failure`` a branch's failure (after its
        retries) cancels the branches not yet started, whose results (and
        ``branch`` events) are cancelled ones; those running finish, and the fan-in runs on them
        all (unlike ``compile(fail_fast=True)``, which fails the run).
        """
        where = f"map edge {source} -> {target}"
        problems = []
        if not fan_in or not isinstance(fan_in, str):
            problems.append(f"{where}: fan_in is required (the node where the branches meet)")
        if isinstance(over, str):
            if not over:
                problems.append(f"{where}: 'over' must be a non-empty state key")
        elif not (isinstance(over, Expression) or callable(over)):
            problems.append(f"{where}: 'over' must be a state key, an expression or a callable "
                            f"of the state, got {type(over).__name__}")
        for role, key in (("item_key", item_key), ("index_key", index_key)):
            if not isinstance(key, str) or not key:
                problems.append(f"{where}: {role} must be a non-empty string, got {key!r}")
        if isinstance(item_key, str) and item_key == index_key:
            problems.append(f"{where}: item_key and index_key are both {item_key!r}")
        problems.extend(f"{where}: {p}" for p in limit_problems(max_concurrency=max_concurrency,
                                                                  integers=True))
        try:
            retry = as_policy(retry, f"{where}: retry")
        except ValueError as exc:
            problems.append(f"{where}: retry: {exc}" if not str(exc).startswith(where)
                            else str(exc))
        if problems:
            raise GraphError(problems=problems)
        self._maps.append(MapFanOut(target=target, fan_in=fan_in, over=over, item_key=item_key,
                                    index_key=index_key, max_concurrency=max_concurrency,
                                    retry=retry,
                                    cancel_unstarted_on_failure=cancel_unstarted_on_failure))
        self._map_sources.append(source)
        return self

    def set_entry_point(self, name: str) -> StateGraph:
        """Make ``name`` the first node."""
        if self._entry is not None and self._entry != name:
            raise GraphError(f"two entry points: {self._entry!r} and {name!r}")
        self._entry = name
        return self

    def set_finish_point(self, name: str) -> StateGraph:
        """End the run after ``name``."""
        self._finish.add(name)
        return self

    def subgraph_nodes(self) -> dict[str, SubgraphNode]:
        """The subgraph nodes added so far, by name."""
        return {name: node for name, node in self._nodes.items()
                if isinstance(node, SubgraphNode)}

    def validate(self) -> list[str]:
        """Every problem with the graph, each naming its node or edge.

        A subgraph node's inner ``StateGraph`` is validated too (its problems
        start with the node's name); a graph that contains itself, directly
        or through others, is one problem naming the cycle of nodes.
        """
        cycle = _subgraph_cycle(self, [], [self])
        if cycle is not None:
            return [f"a graph contains itself through subgraph nodes "
                    f"{' → '.join(map(repr, [*cycle, cycle[0]]))}"]
        return self._problems()

    def _problems(self) -> list[str]:
        problems: list[str] = []
        known = set(self._nodes)
        for name, node in self._nodes.items():
            if not isinstance(node, SubgraphNode):
                continue
            if name in self._fan_in_nodes:
                problems.append(f"node {name!r}: a subgraph node cannot be a fan-in node (it "
                                f"gets no parallel_results); fan in first, then run it")
            if isinstance(node.graph, StateGraph):
                problems.extend(f"node {name!r}: {problem}" for problem in node.graph.validate())

        def check(name: str, where: str) -> None:
            if name != END and name not in known:
                problems.append(f"{where}: unknown node {name!r}")

        if self._entry is None:
            problems.append(f"no entry point: add an edge from {START} or set_entry_point()")
        elif self._entry not in known:
            problems.append(f"entry point: unknown node {self._entry!r}")
        for source, target, _ in self._edges:
            check(source, f"edge {source} -> {target}")
            check(target, f"edge {source} -> {target}")
        for name in self._finish:
            check(name, "finish point")
        for source, (_, mapping) in self._routers.items():
            check(source, f"conditional edges from {source!r}")
            for value, target in (mapping or {}).items():
                check(target, f"conditional edge {source} -[{value!r}]-> {target}")
        fan_ins: dict[str, set[str]] = {}
        for source, target, fan_in, _ in self._parallel:
            where = f"parallel edge {source} -> {target}"
            check(source, where)
            check(target, where)
            if fan_in not in known:
                problems.append(f"{where}: fan-in node {fan_in!r} does not exist")
            elif fan_in not in self._fan_in_nodes:
                problems.append(f"{where}: node {fan_in!r} is used as a fan-in node but was not "
                                f"declared as one (add_fan_in_node / YAML 'fan_in: true')")
            if target == fan_in:
                problems.append(f"{where}: a branch cannot start at its own fan-in node")
            fan_ins.setdefault(source, set()).add(fan_in)
        map_counts: dict[str, int] = {}
        for source, fan_out in zip(self._map_sources, self._maps, strict=True):
            where = f"map edge {source} -> {fan_out.target}"
            check(source, where)
            check(fan_out.target, where)
            if fan_out.target == END:
                problems.append(f"{where}: a map branch must start at a node, not {END}")
            if fan_out.fan_in not in known:
                problems.append(f"{where}: fan-in node {fan_out.fan_in!r} does not exist")
            elif fan_out.fan_in not in self._fan_in_nodes:
                problems.append(f"{where}: node {fan_out.fan_in!r} is used as a fan-in node but "
                                f"was not declared as one (add_fan_in_node / YAML 'fan_in: true')")
            if fan_out.target == fan_out.fan_in:
                problems.append(f"{where}: a branch cannot start at its own fan-in node")
            map_counts[source] = map_counts.get(source, 0) + 1
            if map_counts[source] == 2:
                problems.append(f"node {source!r} has two map edges; a node fans out through "
                                f"one map edge at most")
            if source in fan_ins:
                problems.append(f"{where}: node {source!r} also has parallel edges; a node fans "
                                f"out through parallel edges or one map edge, never both")
            normal = [t for s, t, _ in self._edges if s == source]
            if (normal or source in self._routers or source in self._finish) \
                    and map_counts[source] == 1:
                problems.append(f"{where}: node {source!r} also has other outgoing edges; "
                                f"route after its fan-in node instead")
        for source, targets in fan_ins.items():
            if len(targets) > 1:
                problems.append(f"fan-out from {source!r} names {len(targets)} fan-in nodes "
                                f"({', '.join(sorted(targets))}); one fan-out has one fan-in")
            normal = [t for s, t, _ in self._edges if s == source]
            if normal or source in self._routers or source in self._finish:
                problems.append(f"node {source!r} has parallel edges and other outgoing edges; "
                                f"route after its fan-in node instead")
        for source in {s for s, _, _ in self._edges}:
            defaults = [t for s, t, c in self._edges if s == source and c is None]
            if source in self._finish:
                defaults.append(END)
            if len(defaults) > 1:
                problems.append(f"node {source!r} has {len(defaults)} unconditional edges "
                                f"({', '.join(defaults)}); use parallel edges or conditions")
            if source in self._routers:
                problems.append(f"node {source!r} has both a router and plain edges")
        return problems

    def compile(self, isolation: str = DEFAULT_ISOLATION, max_workers: int | None = None,
                branch_timeout: float | None = None, fail_fast: bool = DEFAULT_FAIL_FAST, *,
                max_concurrency: int | None = None,
                lua_timeout: float | None = DEFAULT_LUA_TIMEOUT,
                lua_max_memory: int | None = DEFAULT_LUA_MAX_MEMORY,
                variables: dict | None = None, max_steps: int = DEFAULT_MAX_STEPS,
                backend_options: dict[str, Any] | None = None,
                name: str | None = None, branch_max_memory: int | str | None = None,
                branch_retry: RetryPolicy | Mapping[str, Any] | int | None = None,
                checkpointer: SqliteCheckpointer | None = None,
                interrupt_before: Iterable[str] = (), interrupt_after: Iterable[str] = (),
                cache: SqliteCache | None = None,
                **backend_keywords: Any) -> CompiledGraph:
        """Validate the graph and freeze it into a runnable ``CompiledGraph``.

        ``max_concurrency`` bounds the branches of one fan-out running at once
        (default: the backend's worker count; a map edge may set its own).
        ``backend_options`` and any other keyword (``fresh_worker_per_branch=True``,
        ``start_method="spawn"``) go to the ``isolation`` backend's factory.
        ``branch_max_memory`` (bytes or a size such as ``"512MiB"``) caps each
        branch's memory where the backend can enforce it (``process``, a
        local ``dask`` cluster) and is refused elsewhere. ``branch_retry`` is
        the retry policy of every fan-out whose edge sets none. ``checkpointer``
        (a ``SqliteCheckpointer``) records every run so it can be resumed.
        ``interrupt_before``/``interrupt_after`` are breakpoints: node names the
        main path pauses before / after (they need a checkpointer).
        ``cache`` (a ``SqliteCache``) serves the nodes added with a
        ``CachePolicy``, and those of the subgraphs compiled with this graph.
        Raises ``GraphError`` listing every problem.
        """
        backend_options = {**(backend_options or {}), **backend_keywords}
        problems = self.validate()
        if isolation not in available_backends():
            problems.append(f"unknown isolation backend {isolation!r}; available: "
                            f"{', '.join(available_backends())}")
        problems.extend(limit_problems(max_workers=max_workers, branch_timeout=branch_timeout,
                                        max_steps=max_steps))
        try:
            branch_max_memory = memory_limit.parse_limit(branch_max_memory)
        except ValueError as exc:
            problems.append(str(exc))
        if isolation in available_backends():
            problems.extend(_backend_option_problems(isolation, backend_options))
        problems.extend(limit_problems(max_concurrency=max_concurrency, integers=True))
        try:
            branch_retry = as_policy(branch_retry, "compile(): branch_retry")
        except ValueError as exc:
            problems.append(f"compile(): branch_retry: {exc}")
        if checkpointer is not None and not isinstance(checkpointer, SqliteCheckpointer):
            problems.append(f"checkpointer must be a SqliteCheckpointer, got "
                            f"{type(checkpointer).__name__}")
        problems.extend(_breakpoint_problems(set(self._nodes), checkpointer, before=interrupt_before,
                                             after=interrupt_after))
        if cache is not None and not isinstance(cache, SqliteCache):
            problems.append(f"cache must be a SqliteCache, got {type(cache).__name__}")
        problems.extend(f"node {name!r}: cache: a fan-in node cannot be cached (its input "
                        f"includes its branches' results)"
                        for name in sorted(self._fan_in_nodes & set(self._node_caches)))
        backend = None
        if not problems:
            # Built now (its workers start lazily) so bad backend options fail here.
            try:
                backend = create_backend(isolation, max_workers=max_workers,
                                         **(backend_options or {}))
            except (GraphError, ValueError) as exc:
                problems.append(str(exc))
        if backend is not None and branch_max_memory is not None:
            refused = memory_limit.refusal(backend, branch_max_memory)
            if refused:
                backend.close()
                problems.append(refused)
        if problems:
            raise GraphError(problems=problems)
        routes: dict[str, Routes] = {name: Routes() for name in self._nodes}
        for source, target, condition in self._edges:
            if condition is None:
                routes[source].default = target
            else:
                routes[source].conditional.append((condition, target))
        for source in self._finish:
            routes[source].default = END
        for source, (router, mapping) in self._routers.items():
            routes[source].router, routes[source].mapping = router, mapping
        static: dict[str, tuple[list[str], str, list[RetryPolicy | None]]] = {}
        for source, target, fan_in, retry in self._parallel:
            entry = static.setdefault(source, ([], fan_in, []))
            entry[0].append(target)
            entry[2].append(retry)
        fan_outs: dict[str, FanOut] = {
            source: StaticFanOut(tuple(targets), fan_in,
                                 retries=tuple(retries) if any(retries) else ())
            for source, (targets, fan_in, retries) in static.items()}
        fan_outs.update(zip(self._map_sources, self._maps, strict=True))
        assert self._entry is not None and backend is not None
        nodes = {name: _compiled_subgraph(node, lua_timeout=lua_timeout,
                                          lua_max_memory=lua_max_memory, variables=variables,
                                          max_steps=max_steps, cache=cache)
                 if isinstance(node, SubgraphNode) else node
                 for name, node in self._nodes.items()}
        compiled = CompiledGraph(
            nodes=nodes, routes=routes, fan_outs=fan_outs, entry=self._entry,
            isolation=isolation, max_workers=max_workers, branch_timeout=branch_timeout,
            fail_fast=fail_fast, lua_timeout=lua_timeout, lua_max_memory=lua_max_memory,
            variables=dict(variables or {}), max_steps=max_steps,
            backend_options=dict(backend_options or {}), name=name,
            branch_max_memory=branch_max_memory, max_concurrency=max_concurrency,
            node_retries=dict(self._node_retries), branch_retry=branch_retry,
            schema=self.schema, checkpointer=checkpointer, backend=backend,
            interrupt_before=interrupt_before, interrupt_after=interrupt_after,
            memos=NodeMemos(cache=cache, replayed=frozenset(self._replayed), cached={
                name: CachedNode(policy, node_fingerprint(nodes[name]))
                for name, policy in self._node_caches.items()} if cache is not None else {}))
        return compiled


def _breakpoint_problems(nodes: set[str], checkpointer: SqliteCheckpointer | None, *,
                         before: Iterable[str], after: Iterable[str]) -> list[str]:
    """What is wrong with the breakpoints ``before`` and ``after`` (node names) of a graph
    of ``nodes``."""
    problems = []
    for key, names in (("interrupt_before", before), ("interrupt_after", after)):
        if isinstance(names, str) or not isinstance(names, Iterable) or not all(
                isinstance(name, str) for name in names):
            problems.append(f"{key} must be a list of node names, got {names!r}")
            continue
        unknown = [name for name in names if name not in nodes]
        if unknown:
            problems.append(f"{key}: unknown node(s) {', '.join(map(repr, unknown))}")
        if names and checkpointer is None:
            problems.append(f"{key} needs a checkpointer to pause the run (compile("
                            f"checkpointer=SqliteCheckpointer()) or YAML settings.checkpoint)")
    return problems


def _subgraph_cycle(graph: StateGraph, names: list[str], stack: list[StateGraph]
                    ) -> list[str] | None:
    """The subgraph nodes of a cycle of graphs that contain each other, or None.

    ``stack`` holds the graphs entered through the nodes ``names``.
    """
    for name, node in graph.subgraph_nodes().items():
        inner = node.graph
        if not isinstance(inner, StateGraph):
            continue  # a CompiledGraph was built before it was added: it cannot hold this one
        for position, outer in enumerate(stack):
            if outer is inner:
                return [*names[position:], name]
        found = _subgraph_cycle(inner, [*names, name], [*stack, inner])
        if found is not None:
            return found
    return None


def _compiled_subgraph(node: SubgraphNode, *, lua_timeout: float | None,
                       lua_max_memory: int | None, variables: dict | None, max_steps: int,
                       cache: SqliteCache | None = None) -> SubgraphNode:
    """``node`` with its inner ``StateGraph`` compiled, under the outer graph's Lua limits,
    variables, ``max_steps`` and cache (a ``CompiledGraph`` keeps its own).

    Its backend is never used: inner fan-outs run on the outer run's backend.
    """
    if not isinstance(node.graph, StateGraph):
        return node
    try:
        inner = node.graph.compile(isolation="inline", lua_timeout=lua_timeout,
                                   lua_max_memory=lua_max_memory, variables=variables,
                                   max_steps=max_steps, name=node.name, cache=cache)
    except GraphError as exc:
        raise GraphError(problems=[f"node {node.name!r}: {problem}"
                                   for problem in exc.problems]) from exc
    return SubgraphNode(node.name, inner, input=node.input, output=node.output)


@functools.cache
def _compile_keywords() -> frozenset[str]:
    parameters = inspect.signature(StateGraph.compile).parameters.values()
    return frozenset(p.name for p in parameters
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self")


def _backend_option_problems(isolation: str, options: dict[str, Any]) -> list[str]:
    """Options the backend's factory does not declare, named before it is called."""
    accepted = declared_backend_options(isolation)
    if accepted is None:
        return []
    own = _compile_keywords()
    problems = []
    for key in sorted(set(options) - accepted, key=str):
        if key in own:
            problems.append(f"compile(): {key!r} is a keyword of compile() itself, "
                            f"not an option of isolation backend {isolation!r}")
            continue
        problems.append(unknown(f"compile(): unknown keyword {key!r} for isolation backend "
                                f"{isolation!r}", key, own - {"backend_options"} | accepted))
    return problems


def _policy(value: Any, where: str) -> RetryPolicy | None:
    try:
        return as_policy(value, where)
    except ValueError as exc:
        raise GraphError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
