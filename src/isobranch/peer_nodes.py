"""Node kinds only the_edge_agent's YAML format has: ``type: while_loop``, ``output:``,
and Python code that is a Jinja2 template.

A ``WhileLoopNode`` runs its body nodes in order, again and again, while its
condition holds, at most ``max_iterations`` times, as one step of the graph:
the format defines the loop as one node, so its iterations are not steps of
their own (no events, checkpoints or breakpoints between them). A
``ResultUnderKey`` node stores what its code returned under one state key,
a ``PeerPythonNode`` has the globals that format gives Python code, and a
``TemplatedPythonNode`` renders its code as a Jinja2 template before each
run, as that format does. All are plain picklable objects like the nodes
they hold, so they run on every backend.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import types
from typing import TYPE_CHECKING, Any

from .code_location import CodeLocation, line_count
from .conditions import Condition
from .errors import (
    BranchCancelled,
    BranchTimeout,
    CodeTemplateError,
    GraphExecutionError,
    LoopBodyError,
)
from .jinja_conditions import (
    UNAVAILABLE_NAMES,
    compile_template,
    render_template,
    template_references,
)
from .keys import Language
from .nodes import Node, PythonNode, PythonSourceNode

if TYPE_CHECKING:
    from .branch import ParallelFlowResult
    from .context import ExecutionContext

# What ends a run or pauses it rather than failing the body: passed on as it is.
_NOT_THE_BODYS_FAILURE = (BranchTimeout, BranchCancelled, GraphExecutionError)
# The bounds the format puts on a loop's max_iterations.
MIN_ITERATIONS = 1
MAX_ITERATIONS = 1000


class WhileLoopNode(Node):
    """the_edge_agent's ``type: while_loop``: ``body`` runs while ``condition`` holds.

    The condition is evaluated before each iteration; the loop ends when it
    is false or after ``max_iterations`` iterations, whichever comes first
    (neither is an error). Within the loop, each body node's returned dict
    is merged into a working copy of the state by plain assignment, which
    the next body node and the next condition see; the node's update is
    every key the loop added or rebound, merged like any node's update.
    """

    def __init__(self, name: str, condition: Condition, max_iterations: int,
                 body: list[Node]) -> None:
        self.name = name
        self.condition = condition
        self.max_iterations = max_iterations
        self.body = body
        # A Lua body's empty table may stand for an empty list (the runner's merge
        # decides by the node's language).
        self.language = (Language.LUA if any(node.language == Language.LUA for node in body)
                         else Language.PYTHON)

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> dict:
        working = dict(state)
        for iteration in range(self.max_iterations):
            try:
                holds = self.condition.holds(working, context)
            except _NOT_THE_BODYS_FAILURE:
                raise
            except Exception as exc:
                raise LoopBodyError(
                    f"while_loop {self.name!r}: condition {self.condition.expression!r} failed "
                    f"at iteration {iteration}: {type(exc).__name__}: {exc}") from exc
            if not holds:
                break
            for node in self.body:
                try:
                    update = context.resolve(node.run(working, context))
                except _NOT_THE_BODYS_FAILURE:
                    raise
                except Exception as exc:
                    raise LoopBodyError(
                        f"while_loop {self.name!r}: body node {node.name!r} failed at "
                        f"iteration {iteration}: {type(exc).__name__}: {exc}") from exc
                if update is None:
                    continue
                if not isinstance(update, dict):
                    raise LoopBodyError(
                        f"while_loop {self.name!r}: body node {node.name!r} returned a "
                        f"{type(update).__name__}, not a dict of state updates "
                        f"(iteration {iteration})")
                working.update(update)
        return {key: value for key, value in working.items()
                if key not in state or state[key] is not value}

    def identity_parts(self) -> list[Any]:
        return ["while_loop", self.condition, self.max_iterations, *self.body]

    def failure_site(self, error: BaseException) -> str | None:
        cause = error.__cause__ if isinstance(error, LoopBodyError) else error
        if cause is None:
            return None
        for part in (*self.body, self.condition):
            site = part.failure_site(cause)
            if site is not None:
                return site
        return None


# The line that ends code without ``return`` (see PeerPythonNode); the helper is a global.
_LOCALS_HELPER = "__isobranch_assigned__"
_RETURN_LOCALS = f"\nreturn {_LOCALS_HELPER}(locals())\n"
# The body function's parameters: not names the code assigned.
_PARAMETERS = frozenset({"state", "variables", "parallel_results"})


def _assigned(names: dict[str, Any]) -> dict[str, Any]:
    """The names code without ``return`` assigned, as the format's update: not ``_x``,
    not the body's parameters, not modules, functions or classes (no state value)."""
    return {name: value for name, value in names.items()
            if not name.startswith("_") and name not in _PARAMETERS
            and not isinstance(value, (types.ModuleType, types.FunctionType, type))}


class PeerPythonNode(PythonNode):
    """Python code of the_edge_agent's format.

    ``json`` is a global, as that format gives it, and so is the module
    ``datetime`` when the code names it. Code in which the word ``return``
    does not appear updates the state with the names it assigned (except
    ``_x``, modules, functions and classes), as that format runs it.
    """

    def __init__(self, name: str, source: str, **options: Any) -> None:
        if "return" not in source:
            # Appended after the code, its lines keep their numbers in messages.
            source = source.rstrip("\n") + _RETURN_LOCALS
        super().__init__(name, source, **options)

    def globals(self) -> dict[str, Any]:
        names = super().globals()
        names["json"] = json
        names[_LOCALS_HELPER] = _assigned
        if "datetime" in self.source:
            names["datetime"] = datetime
        return names


class ResultUnderKey(Node):
    """A node whose ``output: key`` stores what its code returned under ``key``.

    The returned value, whatever it is (a dict too), becomes ``{key: value}``;
    ``None`` (no ``return``) stores ``None``.
    """

    def __init__(self, inner: Node, key: str) -> None:
        self.name = inner.name
        self.inner = inner
        self.key = key
        self.language = inner.language

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> dict:
        return {self.key: context.resolve(self.inner.run(state, context, parallel_results))}

    def identity_parts(self) -> list[Any]:
        return ["output", self.key, self.inner]

    def failure_site(self, error: BaseException) -> str | None:
        return self.inner.failure_site(error)


# What makes Python code of the format a template, rendered before each run: Jinja2's
# ``{{ }}`` and ``{% %}``, and the ``${name}`` of a variable, which the format also replaces.
_TEMPLATE_MARKS = ("{{", "{%", "${")
_VARIABLE_REFERENCE = re.compile(r"\$\{([^}]+)\}")
# Compiled code kept per node, one per distinct rendered text (most templates render to a
# few texts; one that embeds a changing value would otherwise grow without bound).
RENDERED_CODE_CACHE_SIZE = 64


def is_code_template(code: str) -> bool:
    """Whether Python ``code`` of the format is a template the format renders before running."""
    return any(mark in code for mark in _TEMPLATE_MARKS)


def peer_python_node(name: str, source: str, *, origin: str | None = None,
                     location: CodeLocation | None = None) -> Node:
    """The node for Python code of the format: templated if the code is a template.

    Raises ``SyntaxError`` for code that is not Python, ``CodeTemplateError``
    for a template that cannot be used, both naming the node.
    """
    if is_code_template(source):
        return TemplatedPythonNode(name, source, origin=origin, location=location)
    return PeerPythonNode(name, source, origin=origin, location=location)


class TemplatedPythonNode(PythonSourceNode):
    """Python code of the format holding ``{{ }}``, ``{% %}`` or ``${name}``.

    As that format runs such code, it is rendered before each run as a
    Jinja2 template, with ``state`` and ``variables`` in scope (read-only
    views, in the sandboxed environment), and ``${name}`` is replaced by
    the variable ``name`` when there is one; the rendered text then runs as
    a ``PeerPythonNode``. Code without these marks never comes here, so it
    pays nothing. The template is parsed, and the names it reads checked,
    when the node is built; the rendered text is compiled once per distinct
    text (up to ``RENDERED_CODE_CACHE_SIZE`` texts).
    """

    def __init__(self, name: str, source: str, *, origin: str | None = None,
                 location: CodeLocation | None = None) -> None:
        from jinja2 import TemplateSyntaxError
        self._keep_source(name, source, origin, location)
        try:
            unknown = template_references(source).unknown_names
            self._template = compile_template(source)
        except TemplateSyntaxError as exc:
            raise CodeTemplateError(f"node {name!r}: its code is a Jinja2 template (it holds "
                                    f"{{{{ }}}} or {{% %}}) that does not parse: {exc.message} "
                                    f"(line {exc.lineno})") from None
        if unknown:
            advice = "; ".join(f"{reader!r}: {UNAVAILABLE_NAMES.get(reader, 'not in scope')}"
                               for reader in sorted(unknown))
            raise CodeTemplateError(f"node {name!r}: its code is a Jinja2 template that reads "
                                    f"names it cannot see (it sees 'state' and 'variables'): "
                                    f"{advice}")
        # Thread-safe, and per node: nodes are shared by the threads of a run.
        self._compiled = functools.lru_cache(maxsize=RENDERED_CODE_CACHE_SIZE)(self._node_for)

    def identity_parts(self) -> list[Any]:
        return ["python template", self.source]

    def render(self, state: dict, variables: dict) -> str:
        """The code as it runs for ``state``: the template rendered, ``${name}`` replaced."""
        try:
            text = render_template(self._template, state, variables)
        except Exception as exc:
            raise CodeTemplateError(f"node {self.name!r}: rendering its code as a Jinja2 "
                                    f"template failed: {type(exc).__name__}: {exc}") from exc
        return _VARIABLE_REFERENCE.sub(
            lambda match: str(variables[match[1]]) if match[1] in variables else match[0], text)

    def _node_for(self, rendered: str) -> PeerPythonNode:
        # The file's line numbers still hold when rendering kept the number of lines.
        keeps_lines = line_count(rendered) == line_count(self.source)
        try:
            return PeerPythonNode(self.name, rendered, origin=f"{self.origin} (rendered)",
                                  location=self.location if keeps_lines else None)
        except SyntaxError as exc:
            message = exc.msg.removeprefix(f"node {self.name!r}: ")
            raise CodeTemplateError(f"node {self.name!r}: its code, rendered as a Jinja2 "
                                    f"template, is not valid Python: {message} (of the "
                                    f"rendered code:\n{rendered})") from None

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        node = self._compiled(self.render(state, context.graph.variables))
        return node.run(state, context, parallel_results)

    def failure_site(self, error: BaseException) -> str | None:
        return self.location.python_site(error, self.source) if self.location else None
