"""Node kinds: Python source, Lua source, and Python callables.

Nodes built from YAML are plain picklable objects (name, source, language);
their code is compiled on first use in whatever process runs them. Each call
of a Python source node gets a fresh globals namespace, so a ``global``
statement in one branch cannot be seen by another.
"""

from __future__ import annotations

import ast
import builtins
import linecache
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ConfigTypeError

if TYPE_CHECKING:
    from .branch import ParallelFlowResult
    from .context import ExecutionContext

_FUNCTION_NAME = "__isobranch_node__"


class Node:
    """Base of all node kinds: ``run`` returns the update dict (or None)."""

    name: str
    language: str = "python"

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        """Execute the node on ``state``; fan-in nodes also get ``parallel_results``."""
        raise NotImplementedError


class PythonNode(Node):
    """A node whose ``run:`` body is Python: the body of a function of ``state``.

    The body sees ``state``, ``variables`` and, in fan-in nodes,
    ``parallel_results``. Syntax errors are found when the node is built.
    """

    language = "python"

    def __init__(self, name: str, source: str, *, origin: str | None = None) -> None:
        self.name = name
        self.source = source
        self.origin = origin or f"<node {name}>"
        self._code = compile_python_body(source, self.origin, node=name)

    def __getstate__(self) -> dict:
        return {"name": self.name, "source": self.source, "origin": self.origin}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["name"], data["source"], origin=data["origin"])

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": f"isobranch.node.{self.name}"}
        exec(self._code, namespace)
        return namespace[_FUNCTION_NAME](state, context.graph.variables, parallel_results)


class LuaNode(Node):
    """A node whose ``run:`` body is Lua.

    ``state`` is a local of the chunk (fan-in nodes find
    ``state.parallel_results``), ``variables`` is visible too. A returned
    table is the update; ``nil`` means no update.
    """

    language = "lua"

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        if parallel_results is not None:
            state = dict(state)
            state["parallel_results"] = [
                {"branch": r.branch, "index": r.index, "state": r.state, "success": r.success,
                 "error": r.error, "attempts": r.attempts}
                for r in parallel_results
            ]
        return context.run_lua("execute_node_code", self.source, state, chunk_name=self.name)


class CallableNode(Node):
    """A Python callable given to ``StateGraph.add_node``.

    It is called as ``fn(state)``; fan-in nodes as
    ``fn(state, parallel_results)``.
    """

    language = "python"

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise ConfigTypeError(f"node {name!r}: expected a callable, got {type(fn).__name__}")
        self.name = name
        self.fn = fn

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        if parallel_results is None:
            return self.fn(state)
        return self.fn(state, parallel_results)


def as_node(name: str, fn: Callable[..., Any] | Node) -> Node:
    """Wrap ``fn`` as a Node named ``name`` unless it already is one."""
    if isinstance(fn, Node):
        if fn.name != name:
            raise ConfigError(f"node object is named {fn.name!r}, but added as {name!r}")
        return fn
    return CallableNode(name, fn)


def compile_python_body(source: str, filename: str, *, node: str) -> Any:
    """Compile a ``run:`` body as a function so its ``return`` and line numbers work.

    A body that uses ``await`` (or ``async for`` / ``async with``) outside
    any function of its own becomes an ``async def``; the runner awaits it.
    Raises ``SyntaxError`` whose ``lineno`` counts from the body's first line.
    """
    header = f"def {_FUNCTION_NAME}(state, variables, parallel_results):\n"
    body = "".join(f"    {line}" if line.strip() else line
                   for line in source.splitlines(keepends=True)) or "    pass\n"
    if not body.strip():
        body = "    pass\n"
    try:
        tree = ast.parse(header + body, filename=filename)
    except SyntaxError as exc:
        lineno = (exc.lineno or 1) - 1
        raise SyntaxError(f"node {node!r}: {exc.msg} (line {max(lineno, 1)})",
                          (filename, max(lineno, 1), exc.offset, exc.text)) from None
    ast.increment_lineno(tree, -1)
    function = tree.body[0]
    if isinstance(function, ast.FunctionDef) and _awaits(function.body):
        tree.body[0] = ast.copy_location(ast.AsyncFunctionDef(
            name=function.name, args=function.args, body=function.body,
            decorator_list=[], returns=None, type_comment=None), function)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        return compile(tree, filename, "exec")
    except SyntaxError as exc:  # e.g. ``await`` in a function the body defines
        raise SyntaxError(f"node {node!r}: {exc.msg} (line {exc.lineno or 1})",
                          (filename, exc.lineno or 1, exc.offset, exc.text)) from None


def _awaits(body: list[ast.stmt]) -> bool:
    """Whether ``body`` awaits in its own scope (not only in functions it defines)."""
    pending: list[ast.AST] = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            return True
        if isinstance(node, ast.comprehension) and node.is_async:
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        pending.extend(ast.iter_child_nodes(node))
    return False
