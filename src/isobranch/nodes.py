"""Node kinds: Python source, Lua source, and Python callables.

Nodes built from YAML are plain picklable objects (name, source, language,
and where the source is in its file); their code is compiled on first use in
whatever process runs them. Each call of a Python source node gets a fresh
globals namespace, so a ``global`` statement in one branch cannot be seen by
another.
"""

from __future__ import annotations

import ast
import builtins
import linecache
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .code_location import CodeLocation
from .errors import ConfigError, ConfigTypeError
from .interrupts import interrupt
from .keys import Language

if TYPE_CHECKING:
    from .branch import ParallelFlowResult
    from .context import ExecutionContext

_FUNCTION_NAME = "__isobranch_node__"


class Node:
    """Base of all node kinds: ``run`` returns the update dict (or None)."""

    name: str
    language: str = Language.PYTHON

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        """Execute the node on ``state``; fan-in nodes also get ``parallel_results``."""
        raise NotImplementedError

    def identity_parts(self) -> list[Any] | None:
        """What tells this node's code from another's, for checkpoint fingerprints and
        node-cache keys, when its class's ``run`` does not say it all: plain values, nodes
        and conditions (each identified in turn). None: the class and its ``run`` do."""
        return None

    def failure_site(self, error: BaseException) -> str | None:
        """What a message about ``error`` adds: where in its file the node's code raised it.

        ``at agent.yaml:16, line 2 of its code``; None when unknown.
        """
        return None


class PythonSourceNode(Node):
    """A node built from Python source text: what it keeps of that text, and pickling by
    it (a copy is built again from its source, as the original was)."""

    language = Language.PYTHON

    def _keep_source(self, name: str, source: str, origin: str | None,
                     location: CodeLocation | None) -> None:
        self.name = name
        self.source = source
        self.origin = origin or f"<node {name}>"
        self.location = location

    def __getstate__(self) -> dict:
        return {"name": self.name, "source": self.source, "origin": self.origin,
                "location": self.location}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["name"], data["source"], origin=data["origin"],
                      location=data.get("location"))


class PythonNode(PythonSourceNode):
    """A node whose ``run:`` body is Python: the body of a function of ``state``.

    The body sees ``state``, ``variables``, ``interrupt`` (as a Lua node has
    it) and, in fan-in nodes, ``parallel_results``. Syntax errors are found when the node is built.
    With a ``location`` (the body was read from a file), tracebacks name
    that file and its line numbers.
    """

    def __init__(self, name: str, source: str, *, origin: str | None = None,
                 location: CodeLocation | None = None) -> None:
        self._keep_source(name, source, origin, location)
        self._code = compile_python_body(source, self.origin, node=name, location=location)

    def failure_site(self, error: BaseException) -> str | None:
        return self.location.python_site(error, self.source) if self.location else None

    def globals(self) -> dict[str, Any]:
        """The body's global names, fresh for each call (a subclass may add some)."""
        return {"__builtins__": builtins, "__name__": f"isobranch.node.{self.name}",
                "interrupt": interrupt}

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        namespace = self.globals()
        exec(self._code, namespace)
        return namespace[_FUNCTION_NAME](state, context.graph.variables, parallel_results)


class LuaNode(Node):
    """A node whose ``run:`` body is Lua.

    ``state`` is a local of the chunk (fan-in nodes find
    ``state.parallel_results``), ``variables`` is visible too. A returned
    table is the update; ``nil`` means no update. With a ``location`` (the
    body was read from a file), Lua's messages name that file and its line
    numbers.
    """

    language = Language.LUA

    def __init__(self, name: str, source: str, *, location: CodeLocation | None = None) -> None:
        self.name = name
        self.source = source
        self.location = location
        # What the VM runs, under which chunk name.
        self._code, self._chunk_name = (
            (location.lua_code(source), location.lua_chunk_name) if location else (source, name))

    def __getstate__(self) -> dict:
        return {"name": self.name, "source": self.source, "location": self.location}

    def __setstate__(self, data: dict) -> None:
        self.__init__(data["name"], data["source"], location=data.get("location"))

    def failure_site(self, error: BaseException) -> str | None:
        return self.location.lua_site(error, self.source) if self.location else None

    def run(self, state: dict, context: ExecutionContext,
            parallel_results: list[ParallelFlowResult] | None = None) -> Any:
        if parallel_results is not None:
            state = dict(state)
            state["parallel_results"] = [
                {"branch": r.branch, "index": r.index, "state": r.state, "success": r.success,
                 "error": r.error, "attempts": r.attempts}
                for r in parallel_results
            ]
        return context.run_lua("execute_node_code", self._code, state,
                               chunk_name=self._chunk_name)


class CallableNode(Node):
    """A Python callable given to ``StateGraph.add_node``.

    It is called as ``fn(state)``; fan-in nodes as
    ``fn(state, parallel_results)``.
    """

    language = Language.PYTHON

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
            raise ConfigError(f"node {name!r}: the Node object given is named {fn.name!r}")
        return fn
    return CallableNode(name, fn)


def compile_python_body(source: str, filename: str, *, node: str,
                        location: CodeLocation | None = None) -> Any:
    """Compile a ``run:`` body as a function so its ``return`` and line numbers work.

    A body that uses ``await`` (or ``async for`` / ``async with``) outside
    any function of its own becomes an ``async def``; the runner awaits it.
    Raises ``SyntaxError`` whose ``lineno`` counts from the body's first line.
    With a ``location``, the code is compiled under its file's name and line
    numbers instead of ``filename`` and the body's own.
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
    # The header takes line 1: the body's lines move up one, then to the file's.
    ast.increment_lineno(tree, -1 + (location.line - 1 if location else 0))
    function = tree.body[0]
    if isinstance(function, ast.FunctionDef) and _awaits(function.body):
        tree.body[0] = ast.copy_location(ast.AsyncFunctionDef(
            name=function.name, args=function.args, body=function.body,
            decorator_list=[], returns=None, type_comment=None), function)
    if location is not None:
        filename = location.file
        location.remember(source)
    else:
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        return compile(tree, filename, "exec")
    except SyntaxError as exc:  # e.g. ``await`` in a function the body defines
        lineno = (exc.lineno or 1) - (location.line - 1 if location else 0)
        raise SyntaxError(f"node {node!r}: {exc.msg} (line {lineno})",
                          (filename, lineno, exc.offset, exc.text)) from None


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
