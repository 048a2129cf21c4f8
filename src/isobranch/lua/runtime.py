"""LuaRuntime: a sandboxed Lua 5.4 VM with an unconditional time limit.

Each ``LuaRuntime`` owns one ``lupa.lua54`` VM, created on first use and
thrown away after any limit error, so two runtimes never share anything and
a runtime is always usable. The sandbox and the conversion code live in
``sandbox.lua``; user code cannot reach them.

The time limit is a Lua count hook (every 1,000 VM instructions) that reads
the process CPU clock and, once per 5 ms of CPU, asks Python for the wall
clock: Lua runs without the GIL almost all the time, so Lua branches on
threads still scale with cores. The hook is set on every coroutine, a
timeout cannot be caught (after it, every instruction raises), and ``__gc``
finalizers — which run with hooks disabled — are refused. What no hook can
interrupt is one single long C call (a pathological pattern match on a huge
string, say): only a backend that can kill its worker stops that.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lupa.lua54 as lua54

from .convert import ConversionError, from_lua_bytes, plain, to_lua_bytes

DEFAULT_MAX_MEMORY = 512 * 1024 * 1024
HOOK_INSTRUCTIONS = 1000
_SANDBOX_SOURCE = (Path(__file__).parent / "sandbox.lua").read_bytes()
_CODEC_SOURCE = (Path(__file__).parent / "codec.lua").read_bytes()


@functools.cache
def _bytecode() -> tuple[bytes, bytes]:
    """The sandbox and codec chunks, compiled once per process.

    Loading bytecode skips the parser, which is most of the cost of a new VM.
    Only these trusted chunks are ever loaded as bytecode; user code cannot
    load binary chunks.
    """
    compiler = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    dump, load = compiler.eval(b"string.dump"), compiler.eval(b"load")
    return (dump(load(_SANDBOX_SOURCE, b"=isobranch/sandbox.lua", b"t"), True),
            dump(load(_CODEC_SOURCE, b"=isobranch/codec.lua", b"t"), True))


class LuaRuntimeError(Exception):
    """Lua code failed to compile or raised; the message keeps Lua's ``chunk:line:``."""


class LuaTimeoutError(LuaRuntimeError):
    """Lua code ran past its timeout."""


class LuaMemoryError(LuaRuntimeError):
    """Lua code exceeded the VM's ``max_memory``."""


class LuaConversionError(LuaRuntimeError):
    """A value cannot cross the Python/Lua boundary; the message names its path."""


class LuaRuntime:
    """A sandboxed Lua 5.4 VM.

    ``timeout`` (seconds, wall clock, per call; None for no limit) and
    ``max_memory`` (bytes; None for no limit) bound every call. Globals
    persist between calls until a limit error discards the VM.
    ``timeout_hook=False`` runs Lua at bare speed with no hook, for callers
    that enforce the deadline from outside (a worker that can be killed);
    with ``timeout=None`` and no ``should_stop`` there is no hook either, and
    a per-call ``timeout`` is then not enforced.
    ``should_stop`` is polled with the wall clock; when it returns true the
    running call ends as a timeout (used to cancel a branch).
    """

    def __init__(self, timeout: float | None = 30.0, max_memory: int | None = DEFAULT_MAX_MEMORY,
                 *, timeout_hook: bool = True,
                 should_stop: Callable[[], bool] | None = None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be positive or None, got {max_memory!r}")
        self.timeout = timeout
        self.max_memory = max_memory
        self.timeout_hook = timeout_hook
        self.should_stop = should_stop
        self._vm: Any = None
        self._run: Any = None
        self._deadline: float | None = None
        self._expired = False

    # -- public calls -------------------------------------------------------

    def execute(self, code: str, state: dict | None = None, *, variables: dict | None = None,
                chunk_name: str | None = None, timeout: float | None = None) -> Any:
        """Run a chunk with ``state`` as the global ``state``; return its ``return`` value."""
        return self._call("execute", code, state, variables, chunk_name, timeout)

    def eval_condition(self, expr: str, state: dict | None = None, *,
                       variables: dict | None = None, chunk_name: str | None = None,
                       timeout: float | None = None) -> str | None:
        """Evaluate a condition (``return`` optional): ``"true"``/``"false"``, a string, or None."""
        value = self._call("condition", expr, state, variables, chunk_name, timeout)
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value
        return str(value)

    def execute_node_code(self, code: str, state: dict | None = None, *,
                          variables: dict | None = None, chunk_name: str | None = None,
                          timeout: float | None = None) -> dict:
        """Run a node body with ``state`` as a local; a returned table is the update dict.

        ``nil`` gives ``{}``; anything that is not a dict is ``{"result": value}``.
        """
        value = self._call("node", code, state, variables, chunk_name, timeout)
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        return {"result": value}

    def close(self) -> None:
        """Drop the VM; the next call starts a fresh one."""
        self._vm = self._run = None

    def __enter__(self) -> LuaRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _start_vm(self) -> None:
        # encoding=None: strings cross as bytes, so values travel as marshal data.
        options: dict[str, Any] = {"register_eval": False, "register_builtins": False,
                                   "encoding": None}
        if self.max_memory is not None:
            options["max_memory"] = self.max_memory
        vm = lua54.LuaRuntime(**options)
        # No limit to enforce, no hook: Lua then runs at bare speed.
        enforce = self.timeout_hook and (self.timeout is not None or self.should_stop is not None)
        hook_count = HOOK_INSTRUCTIONS if enforce else None
        sandbox, codec = _bytecode()
        self._run = vm.execute(sandbox, self._out_of_time, hook_count, codec)
        self._vm = vm

    def _out_of_time(self) -> bool:
        # Called from the Lua hook about every 5 ms of CPU time.
        past_deadline = self._deadline is not None and time.monotonic() >= self._deadline
        if past_deadline or (self.should_stop is not None and self.should_stop()):
            self._expired = True
        return self._expired

    def _call(self, mode: str, code: str, state: dict | None, variables: dict | None,
              chunk_name: str | None, timeout: float | None) -> Any:
        if not isinstance(code, str):
            raise TypeError(f"Lua code must be a str, got {type(code).__name__}")
        what = chunk_name or "lua"
        state_data = self._to_lua(state, "state")
        variables_data = self._to_lua(variables, "variables")
        if self._run is None:
            self._start_vm()
        limit = timeout if timeout is not None else self.timeout
        self._deadline = time.monotonic() + limit if limit is not None else None
        self._expired = False
        try:
            returned = self._run(mode.encode(), code.encode("utf-8", "surrogateescape"),
                                 ("=" + what).encode("utf-8", "replace"), state_data,
                                 variables_data)
        except lua54.LuaMemoryError as exc:
            self.close()
            raise LuaMemoryError(f"{what}: not enough memory (max_memory={self.max_memory})"
                                 ) from exc
        except lua54.LuaError as exc:
            if self._expired:
                self.close()
                raise self._timeout_error(what, limit) from exc
            message = _lua_message(exc.args[0] if exc.args else exc)
            if message.startswith(_CONVERT):
                raise self._conversion_error(message, state, variables) from exc
            raise LuaRuntimeError(f"{what}: {message}") from exc
        finally:
            self._deadline = None
        status, payload = (*returned, None)[:2]
        status = status.decode() if isinstance(status, bytes) else status
        if status == "scalar":
            if isinstance(payload, bytes):
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LuaConversionError(f"{what}: result: a Lua string is not valid UTF-8 "
                                             f"text ({exc.reason})") from exc
            return payload
        if status == "ok":
            try:
                return from_lua_bytes(payload)
            except ConversionError as exc:
                raise LuaConversionError(f"{what}: {exc}") from exc
        if status == "timeout":
            self.close()
            raise self._timeout_error(what, limit)
        if status == "memory":
            self.close()
            raise LuaMemoryError(f"{what}: not enough memory (max_memory={self.max_memory})")
        message = _lua_message(payload)
        if status == "convert":
            raise LuaConversionError(f"{what}: {message}")
        raise LuaRuntimeError(message)

    def _conversion_error(self, message: str, state: Any, variables: Any) -> LuaConversionError:
        # The VM refused the input; find the exact path on the Python side.
        for value, root in ((state, "state"), (variables, "variables")):
            try:
                plain(value, root)
            except ConversionError as exc:
                return LuaConversionError(str(exc))
        return LuaConversionError(message[len(_CONVERT):])

    def _timeout_error(self, chunk_name: str | None, limit: float | None) -> LuaTimeoutError:
        cancelled = self._deadline is None and self.should_stop is not None
        what = chunk_name or "lua"
        if limit is not None:
            return LuaTimeoutError(f"{what}: Lua code ran past its {limit:g}s timeout")
        return LuaTimeoutError(f"{what}: Lua code was stopped{' (cancelled)' if cancelled else ''}")

    def _to_lua(self, value: Any, root: str) -> bytes | None:
        if value is None:
            return None
        try:
            return to_lua_bytes(value, root)
        except ConversionError as exc:
            raise LuaConversionError(str(exc)) from exc


_CONVERT = "isobranch.convert: "


def _lua_message(raw: Any) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    # lupa appends a Lua traceback to errors it raises; the first line is the message.
    return text.split("\nstack traceback:", 1)[0]
