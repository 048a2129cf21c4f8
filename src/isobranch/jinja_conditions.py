"""Jinja2 expressions (``{{ state.score > 0.8 }}``) as conditions and map item lists.

the_edge_agent's YAML writes conditions and item lists in Jinja2. They are
evaluated in Jinja2's immutable sandbox with ``state`` and ``variables`` as
read-only attribute views, so an expression can read the state but never
change it or reach Python internals. Jinja2 is imported the first time such
an expression is built: a workflow without one never loads it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .conditions import AttributeView, Condition
from .errors import JinjaExpressionError

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from .context import ExecutionContext

# A whole value that is one ``{{ ... }}`` (nothing around it, no second one): its native value.
_ONE_EXPRESSION = re.compile(r"^\s*\{\{(?P<body>.*)\}\}\s*$", re.DOTALL)
# What a rendered template (not one expression) means when a condition reads it, as in
# the_edge_agent: these strings are false, any other non-empty text is true.
_FALSE_TEXTS = frozenset({"", "false", "0", "no", "none"})
# The names an expression may read; the_edge_agent also offers these, which isobranch has not.
SCOPE_NAMES = frozenset({"state", "variables"})
UNAVAILABLE_NAMES = {
    "secrets": "secrets are not supported; pass them in the input state",
    "env": "environment variables are not readable from expressions; pass them in the input state",
    "result": "'result' (the node's own return value) is not available; read it from state, "
              "where it was merged",
    "checkpoint": "'checkpoint' is not available; use isobranch's checkpointer",
    "data": "the top-level 'data' section is not supported; use 'variables'",
    "settings": "'settings' is not readable from expressions; use 'variables'",
}


def is_jinja(text: Any) -> bool:
    """Whether ``text`` is a Jinja2 template (holds ``{{`` or ``{%``)."""
    return isinstance(text, str) and ("{{" in text or "{%" in text)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # Built once per process, on first use; it holds no state of any run.
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return ImmutableSandboxedEnvironment()


@dataclass(frozen=True)
class JinjaReferences:
    """What an expression reads: state keys by name, and names outside its scope."""

    state_keys: frozenset[str]
    unknown_names: frozenset[str]


def template_references(source: str) -> JinjaReferences:
    """What the template ``source`` reads: state keys by name, and names outside its scope.

    Names the template sets itself (``{% for x in ... %}``, ``{% set %}``),
    ``loop`` and Jinja2's own globals (``range``, ``dict`` ...) are in scope.
    Raises ``jinja2.TemplateSyntaxError`` for a template that does not parse.
    """
    from jinja2 import nodes
    environment = _environment()
    tree = environment.parse(source)
    keys: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if isinstance(target, nodes.Name) and target.name == "state":
            if isinstance(node, nodes.Getattr):
                keys.add(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                keys.add(node.arg.value)
    loads = {node.name for node in tree.find_all(nodes.Name) if node.ctx == "load"}
    stores = {node.name for node in tree.find_all(nodes.Name) if node.ctx != "load"}
    in_scope = SCOPE_NAMES | {"loop"} | set(environment.globals)
    return JinjaReferences(frozenset(keys), frozenset(loads - stores - in_scope))


def render_template(template: Template, state: dict, variables: dict) -> str:
    """``template`` rendered with read-only ``state`` and ``variables`` views."""
    return template.render(state=AttributeView(state), variables=AttributeView(variables))


def compile_template(source: str) -> Template:
    """``source`` as a template of the sandboxed environment (``TemplateSyntaxError`` if not)."""
    return _environment().from_string(source)


class JinjaCondition(Condition):
    """A Jinja2 expression over ``state`` and ``variables``; its value, or its truth, decides.

    ``expression`` is the text as written: ``{{ ... }}`` (its native value:
    a list for a map's items, a bool for a condition), a template with text
    around its ``{{ }}`` (the rendered string; ``""``, ``false``, ``0``,
    ``no`` and ``none`` are false), or, with ``bare=True``, an expression
    written without braces. ``where`` names the node or edge in messages.
    A syntax error raises ``jinja2.TemplateSyntaxError`` here, at load time.
    """

    def __init__(self, expression: str, *, where: str = "", bare: bool = False) -> None:
        self.expression = expression
        self.where = where
        self.bare = bare
        environment = _environment()
        match = None if bare else _ONE_EXPRESSION.match(expression)
        if bare or (match and "{{" not in match["body"] and "{%" not in expression):
            self._body = expression if bare else match["body"]  # type: ignore[index]
            self._native = environment.compile_expression(self._body)
            self._template = None
        else:
            self._body = None
            self._native = None
            self._template = environment.from_string(expression)

    def __getstate__(self) -> dict:
        return {"expression": self.expression, "where": self.where, "bare": self.bare}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["expression"], where=data["where"], bare=data["bare"])

    def references(self) -> JinjaReferences:
        """The state keys the expression reads by name and the unknown names it uses."""
        source = "{{ " + self._body + " }}" if self._body is not None else self.expression
        return template_references(source)

    def evaluate(self, state: dict, context: ExecutionContext) -> Any:
        scope = {"state": AttributeView(state),
                 "variables": AttributeView(context.graph.variables)}
        try:
            if self._native is not None:
                return self._native(**scope)
            assert self._template is not None
            return self._template.render(**scope)
        except Exception as exc:
            raise JinjaExpressionError(f"Jinja2 expression {self.expression!r}: "
                                       f"{type(exc).__name__}: {exc}") from exc

    def holds(self, state: dict, context: ExecutionContext) -> bool:
        value = self.evaluate(state, context)
        if self._template is not None:
            return str(value).strip().lower() not in _FALSE_TEXTS
        return bool(value)

    def describe(self) -> str:
        return f"jinja: {self.expression}"
