"""Syntax-check Lua node bodies and conditions without running them.

The checker compiles with Lua's own ``load`` in a bare VM and discards the
result: nothing is ever called, so no sandbox, limit or Python bridge is
needed. Code is wrapped exactly as the runtime wraps it (sandbox.lua), so a
reported line number is the one a run-time error would carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import lupa.lua54 as lua54

# Must equal NODE_PREFIX in sandbox.lua: node bodies get it on their first line.
NODE_PREFIX = "local state, variables = ...; "
_CHUNK = "chunk"
_MESSAGE = re.compile(rf"^{_CHUNK}:(\d+): (.*)$", re.DOTALL)


@dataclass(frozen=True)
class LuaSyntaxError:
    """Where Lua's compiler stopped: ``line`` (1-based, None if unknown) and its message."""

    line: int | None
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


class LuaSyntaxChecker:
    """Compiles Lua text to find syntax errors; one VM, created on first use.

    Not shared between threads: each graph builder makes its own.
    """

    def __init__(self) -> None:
        self._load: Any = None

    def check_node(self, code: str) -> LuaSyntaxError | None:
        """The syntax error in a node body, or None if it compiles."""
        return self._compile(NODE_PREFIX + code)

    def check_condition(self, expression: str) -> LuaSyntaxError | None:
        """The syntax error in a condition, or None.

        Like the runtime: ``return <expression>`` first, else the code as a
        chunk of statements; the error reported is the second one's.
        """
        if self._compile("return " + expression) is None:
            return None
        return self._compile(expression)

    def _compile(self, code: str) -> LuaSyntaxError | None:
        if self._load is None:
            vm = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
            self._load = vm.eval(b"load")
        result = self._load(code.encode("utf-8", "surrogateescape"), f"={_CHUNK}".encode(), b"t")
        if not isinstance(result, tuple):
            return None  # a function: it compiled
        raw = result[1]
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        match = _MESSAGE.match(text)
        if match is None:
            return LuaSyntaxError(None, text)
        return LuaSyntaxError(int(match.group(1)), match.group(2))
