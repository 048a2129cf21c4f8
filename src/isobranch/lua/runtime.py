"""LuaRuntime: a sandboxed Lua 5.4 VM with an unconditional time limit.

Each ``LuaRuntime`` owns one ``lupa.lua54`` VM, created on first use and
thrown away after any limit error, so two runtimes never share anything and
a runtime is always usable. The sandbox lives in ``sandbox.lua``, and what
it loads the first time a VM needs it (conversion, seldom-called library
functions) in the ``.lua`` files beside it; user code cannot reach them.

The time limit is a Lua count hook (every 1,000 VM instructions) that reads
the process CPU clock (at every 8th firing, and at each one after a
collector cycle or a new second) and asks Python for the wall clock at a
call's first firing and then once per 5 ms of CPU: Lua runs without the GIL
almost all the time, so Lua branches on threads still scale with cores. The hook is
set on every coroutine, a timeout cannot be caught (after it, every
instruction raises and no coroutine is created or resumed), no user code
runs while Lua has a thread's hooks off, and ``__gc`` finalizers — which
run with hooks disabled — are refused (``sandbox.lua`` explains each rule).
What no hook can interrupt is one single long C call (a pathological
pattern match on a huge string, say): only a backend that can kill its
worker stops that.

The module is a little over 400 lines because a call's clock, its memory
check and its lazy state share one VM's private upvalues; the Lua side is
in the ``.lua`` files beside it.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lupa.lua54 as lua54

from ..defaults import DEFAULT_LUA_MAX_MEMORY, DEFAULT_LUA_TIMEOUT
from ..errors import (
    ConfigError,
    ConfigTypeError,
    ConversionError,
    InternalError,
    LuaConversionError,
    LuaMemoryError,
    LuaRuntimeError,
    LuaTimeoutError,
)
from .convert import (
    DEPTH_REASON,
    MAX_DEPTH,
    from_lua_bytes,
    item_to_lua_bytes,
    plain,
    plain_item,
    state_key_error,
    to_lua_bytes,
)

HOOK_INSTRUCTIONS = 1000
# Room for lupa's own allocations while it pushes a call's arguments, and
# for each Lua string's header.
_PUSH_SLACK, _STRING_OVERHEAD = 4096, 64
_CHUNKS = ("sandbox", "crossing", "decode", "encode", "lazy", "rarely_used")
# encoding=None: strings cross as bytes, so values travel as marshal data.
_VM_OPTIONS = {"register_eval": False, "register_builtins": False, "encoding": None}
_LIMITED_VM_OPTIONS = {**_VM_OPTIONS, "max_memory": 0}
_DEPTH_REASON = DEPTH_REASON.encode()
# A call without a chunk name, and that name as lupa gets it (encoded once).
_DEFAULT_CHUNK_NAME = "lua"
_DEFAULT_LUA_CHUNK_NAME = b"=lua"


class _Mode(enum.IntEnum):
    """How ``sandbox.lua``'s run() treats a call's code (the same numbers there)."""

    EXECUTE = 1
    NODE = 2
    CONDITION = 3


class _Status(enum.IntEnum):
    """What ``sandbox.lua``'s run() answers (the same numbers there and in crossing.lua).

    Integers, not strings: every distinct string constant costs each new VM
    an allocation when the sandbox is loaded.
    """

    OK = 1
    SCALAR = 2
    FAILED = 3
    CONVERT_FAILED = 4
    TIMED_OUT = 5
    OUT_OF_MEMORY = 6
    CONVERT_INPUT = 7
    CONVERT_ESCAPED = 8


def compile_sandbox() -> None:
    """Compile the sandbox's chunks now, once for this process (a worker's fork server
    does it before it forks, so no worker pays for it)."""
    _sandbox_bytecode()


@functools.cache
def _sandbox_bytecode() -> tuple[bytes, ...]:
    """The sandbox and the chunks it loads on first use, compiled once per process.

    Loading bytecode skips the parser, which is most of the cost of a new VM.
    Only these trusted chunks are ever loaded as bytecode; user code cannot
    load binary chunks.
    """
    compiler = lua54.LuaRuntime(register_eval=False, register_builtins=False, encoding=None)
    dump, load = compiler.eval(b"string.dump"), compiler.eval(b"load")

    def compile_chunk(name: str) -> bytes:
        source = (Path(__file__).parent / f"{name}.lua").read_bytes()
        chunk = load(source, f"=isobranch/{name}.lua".encode(), b"t")
        if chunk is None:
            raise InternalError(f"isobranch: cannot compile {name}.lua")
        return dump(chunk, True)

    return tuple(compile_chunk(name) for name in _CHUNKS)


class LuaRuntime:
    """A sandboxed Lua 5.4 VM with a per-call wall-clock timeout and a memory limit.

    ``timeout`` (seconds, wall clock, per call; None for no limit) and
    ``max_memory`` (bytes; None for no limit) bound every call. The VM is
    created on first use; globals persist between calls until ``close()`` or
    a timeout/memory error, after which the next call gets a fresh VM.

    ``timeout_hook=False`` (or ``timeout=None`` with no ``should_stop``)
    installs no hook at all, so Lua runs at bare speed; the caller must then
    enforce deadlines from outside, e.g. by killing a worker process.
    ``should_stop`` is polled with the wall clock; when it returns true the
    running call ends as a timeout (used to cancel a branch).
    ``deadline_listener`` is called with a call's deadline (``time.monotonic``
    seconds) when the user code starts (after the input is decoded), and with
    None when Lua returns; only calls with a time limit are reported. An
    outside watchdog enforces that window. A per-call
    ``timeout=`` overrides the default, but only on a runtime that has a hook.
    ``interrupt`` is what node code's global ``interrupt(value)`` calls
    (``isobranch.interrupt`` for the nodes of a run; without it, node code
    has no such global): its argument and its answer cross as any value.

    The hook cannot interrupt one single long C call, such as a
    pathological pattern match (``string.find`` with heavy backtracking on
    a huge string) or sorting a huge table with the default comparator: the
    deadline is noticed only when that call returns. Only a backend that can
    kill its worker bounds such a call.
    """

    def __init__(self, timeout: float | None = DEFAULT_LUA_TIMEOUT,
                 max_memory: int | None = DEFAULT_LUA_MAX_MEMORY,
                 *, timeout_hook: bool = True,
                 should_stop: Callable[[], bool] | None = None,
                 deadline_listener: Callable[[float | None], None] | None = None,
                 interrupt: Callable[[Any], Any] | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be positive or None, got {timeout!r}")
        if max_memory is not None and max_memory <= 0:
            raise ConfigError(f"max_memory must be positive or None, got {max_memory!r}")
        self.timeout = timeout
        self.max_memory = max_memory
        self.timeout_hook = timeout_hook
        self.should_stop = should_stop
        self.deadline_listener = deadline_listener
        self.interrupt = interrupt
        # Whether the VM holds the bridge to ``interrupt`` (handed over once per VM).
        self._asks = False
        self._vm: Any = None
        self._run: Any = None
        self._deadline: float | None = None
        self._limit: float | None = None
        self._expired = False
        # The state of the running call, when it crosses lazily: its keys and
        # the dict their values are fetched from on first read in Lua.
        self._lazy_keys: list[str] = []
        self._lazy_state: dict | None = None
        self._lazy_error: ConversionError | None = None
        # When the clock stopped for a lazy value's conversion, and the
        # deadline last given to deadline_listener.
        self._paused_at: float | None = None
        self._reported_deadline: float | None = None

    # -- public calls -------------------------------------------------------

    def execute(self, code: str, state: dict | None = None, *, variables: dict | None = None,
                chunk_name: str | None = None, timeout: float | None = None) -> Any:
        """Run a chunk with ``state`` as the global ``state``; return its ``return`` value.

        ``nil`` comes back as None, tables as lists or dicts.
        """
        return self._call(_Mode.EXECUTE, code, state, variables, chunk_name, timeout)

    def eval_condition(self, expr: str, state: dict | None = None, *,
                       variables: dict | None = None, chunk_name: str | None = None,
                       timeout: float | None = None) -> str | None:
        """Evaluate a condition (``return`` optional) with ``state`` as a global.

        Booleans give ``"true"``/``"false"``, strings come back as they are,
        other values as their ``str()``, ``nil`` as None.
        """
        value = self._call(_Mode.CONDITION, expr, state, variables, chunk_name, timeout)
        if value is None:
            return None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return value
        return str(value)

    def evaluate(self, expr: str, state: dict | None = None, *, variables: dict | None = None,
                 chunk_name: str | None = None, timeout: float | None = None) -> Any:
        """Evaluate an expression (``return`` optional) with ``state`` as a global.

        Unlike ``eval_condition`` the value comes back as Python, unchanged:
        a sequence table is a list, ``nil`` is None.
        """
        return self._call(_Mode.CONDITION, expr, state, variables, chunk_name, timeout)

    def execute_node_code(self, code: str, state: dict | None = None, *,
                          variables: dict | None = None, chunk_name: str | None = None,
                          timeout: float | None = None) -> dict:
        """Run a node body with ``state`` as a local; a returned table is the update dict.

        ``nil`` gives ``{}``; anything that is not a dict (a scalar, or a
        table that converts to a list) is ``{"result": value}``.
        """
        value = self._call(_Mode.NODE, code, state, variables, chunk_name, timeout)
        if value is None:
            return {}
        if isinstance(value, dict):
            return value
        return {"result": value}

    def close(self) -> None:
        """Drop the VM; the next call starts a fresh one."""
        self._vm = self._run = None
        self._asks = False

    def __enter__(self) -> LuaRuntime:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------

    def _start_vm(self) -> None:
        # A limit of 0 is none: the setup must not fail half-way however small
        # the limit is, so the VM gets its limit once the sandbox is made.
        vm = lua54.LuaRuntime(**(_VM_OPTIONS if self.max_memory is None
                                 else _LIMITED_VM_OPTIONS))
        # No limit to enforce, no hook: Lua then runs at bare speed.
        enforce = self.timeout_hook and (self.timeout is not None or self.should_stop is not None)
        # The only Python objects the VM ever holds: bound methods (see _for_lua), kept as
        # private upvalues of the sandbox.
        sandbox, crossing, decode, encode, lazy, rarely_used = _sandbox_bytecode()
        self._run = vm.execute(sandbox, _for_lua(self._out_of_time),
                               HOOK_INSTRUCTIONS if enforce else None,
                               crossing, decode, encode, lazy, rarely_used,
                               _for_lua(self._armed) if self.deadline_listener is not None
                               else None,
                               MAX_DEPTH, _DEPTH_REASON)
        if self.max_memory is not None:
            vm.set_max_memory(self.max_memory)
        self._vm = vm

    def _arguments_fit(self, *arguments: bytes | None) -> bool:
        """Whether lupa can push the call's arguments without exceeding ``max_memory``.

        lupa copies arguments onto the Lua stack outside any protected call,
        where running out of memory makes Lua abort the whole process; so a
        call whose input cannot fit fails here instead, before Lua sees it.
        """
        # A loop, not sum() over a generator: this runs on every call.
        incoming = _PUSH_SLACK
        for argument in arguments:
            if argument:
                incoming += len(argument) + _STRING_OVERHEAD
        return self._vm.get_memory_used() + incoming <= self.max_memory

    def _armed(self) -> None:
        # Called from Lua once the input is decoded and the user code starts.
        if self._limit is not None and self.deadline_listener is not None:
            self._reported_deadline = time.monotonic() + self._limit
            self.deadline_listener(self._reported_deadline)

    def _fetch_state_value(self, index: int, decoded: bool = False) -> bytes | bool | None:
        # Called from Lua the first time it reads a key of a lazy state:
        # that value's bytes, False if it cannot be converted (the error is
        # kept for the call's result), None if it would not fit in max_memory.
        # Converting the state is not Lua's time, as when a whole state was
        # converted before the call: the clock stops from here until Lua
        # calls again with decoded=True.
        if decoded:
            self._resume_lua_clock()
            return None
        state = self._lazy_state
        if state is None or not 1 <= index <= len(self._lazy_keys):
            return False
        key = self._lazy_keys[index - 1]
        try:
            data = item_to_lua_bytes(state, key)
        except ConversionError as exc:
            self._lazy_error = self._lazy_error or exc
            return False
        # lupa pushes the result where running out of memory would abort
        # the process (see _arguments_fit).
        if self.max_memory is not None and not self._arguments_fit(data):
            return None
        self._paused_at = time.monotonic()
        if self.deadline_listener is not None and self._limit is not None:
            self.deadline_listener(None)
        return data

    def _ask(self, data: bytes) -> bytes | None:
        # Called from Lua by the global interrupt(value): ``data`` is ``{value}`` encoded;
        # the answer goes back as ``{answer}``. What ``interrupt`` raises (the pause)
        # ends the Lua call as an error, and the step loop pauses the node anyway.
        assert self.interrupt is not None
        value = from_lua_bytes(data)
        answer = self.interrupt(value[0] if isinstance(value, list) and value else None)
        return to_lua_bytes([answer], "interrupt() answer")

    def _resume_lua_clock(self) -> None:
        if self._paused_at is None:
            return
        paused, self._paused_at = time.monotonic() - self._paused_at, None
        if self._deadline is not None:
            self._deadline += paused
        if self._reported_deadline is not None and self.deadline_listener is not None:
            self._reported_deadline += paused
            self.deadline_listener(self._reported_deadline)

    def _out_of_time(self) -> bool:
        # Called from the Lua hook about once per 5 ms of CPU time.
        past_deadline = self._deadline is not None and time.monotonic() >= self._deadline
        if past_deadline or (self.should_stop is not None and self.should_stop()):
            self._expired = True
        return self._expired

    def _call(self, mode: _Mode, code: str, state: Any, variables: Any,
              chunk_name: str | None, timeout: float | None) -> Any:
        if not isinstance(code, str):
            raise ConfigTypeError(f"Lua code must be a str, got {type(code).__name__}")
        if chunk_name:
            name, lua_name = chunk_name, ("=" + chunk_name).encode("utf-8", "surrogateescape")
        else:
            name, lua_name = _DEFAULT_CHUNK_NAME, _DEFAULT_LUA_CHUNK_NAME
        lazy = state is not None and _crosses_lazily(state)
        state_data = None if state is None else self._to_lua(list(state) if lazy else state,
                                                             "state")
        variables_data = None if variables is None else self._to_lua(variables, "variables")
        source = code.encode("utf-8", "surrogateescape")
        if self._run is None:
            self._start_vm()
        if self.max_memory is not None and not self._arguments_fit(source, lua_name, state_data,
                                                                   variables_data):
            self.close()
            raise self._memory_error(name)
        limit = timeout if timeout is not None else self.timeout
        self._deadline = time.monotonic() + limit if limit is not None else None
        self._limit = limit
        self._expired = False
        self._paused_at = self._reported_deadline = None
        self._lazy_keys, self._lazy_state, self._lazy_error = (list(state), state, None) if lazy \
            else ([], None, None)
        failed_index = None
        try:
            # A lazy state's values come through this callback, passed only
            # with the call that needs it (handing a VM a Python callable
            # costs a microsecond, and most VMs never see a lazy state).
            fetch = _for_lua(self._fetch_state_value) if lazy else None
            ask = None
            if self.interrupt is not None and not self._asks and mode is _Mode.NODE:
                ask, self._asks = _for_lua(self._ask), True
            # ``mode`` crosses as it is: an IntEnum member is a Lua integer to
            # lupa, and reading ``.value`` costs as much as a short call.
            status, payload, failed_index = self._run(mode, source, lua_name,
                                                      state_data, variables_data, fetch, ask)
        except lua54.LuaMemoryError as exc:
            self.close()
            raise self._memory_error(name) from exc
        except lua54.LuaError as exc:
            # Only the sandbox's own code runs unprotected; treat as fatal for this VM.
            self.close()
            if self._expired:
                raise self._timeout_error(name, limit) from exc
            raise LuaRuntimeError(f"{name}: {_lua_message(exc.args[0] if exc.args else exc)}"
                                  ) from exc
        finally:
            self._deadline = None
            lazy_keys, self._lazy_keys, self._lazy_state = self._lazy_keys, [], None
            if self.deadline_listener is not None and self._limit is not None:
                self.deadline_listener(None)
        if status == _Status.SCALAR:
            if isinstance(payload, bytes):
                try:
                    return payload.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LuaConversionError(f"result: a Lua string is not valid UTF-8 text "
                                             f"({exc.reason})") from exc
            return payload
        if status == _Status.OK:
            try:
                return from_lua_bytes(payload)
            except ConversionError as exc:
                raise LuaConversionError(str(exc)) from exc
        if status == _Status.TIMED_OUT:
            self.close()
            raise self._timeout_error(name, limit)
        if status == _Status.OUT_OF_MEMORY:
            self.close()
            raise self._memory_error(name)
        message = _lua_message(payload)
        if status == _Status.CONVERT_ESCAPED:
            # A state kept past its call could not be filled: the VM, which
            # still refers to it, is thrown away.
            self.close()
            status = _Status.CONVERT_INPUT
        if status == _Status.CONVERT_INPUT:
            if self._lazy_error is not None:
                raise LuaConversionError(str(self._lazy_error))
            if failed_index is not None and lazy:
                try:
                    plain_item(state, lazy_keys[failed_index - 1])
                except ConversionError as exc:
                    raise LuaConversionError(str(exc)) from None
                raise LuaConversionError(f"state[{lazy_keys[failed_index - 1]!r}]: {message}")
            raise self._input_conversion_error(message, state, variables)
        if status == _Status.CONVERT_FAILED:
            raise LuaConversionError(message)
        raise LuaRuntimeError(message)

    def _input_conversion_error(self, message: str, state: Any,
                                variables: Any) -> LuaConversionError:
        # The VM refused an input; find the exact path on the Python side.
        for value, root in ((state, "state"), (variables, "variables")):
            try:
                plain(value, root)
            except ConversionError as exc:
                return LuaConversionError(str(exc))
        return LuaConversionError(f"state: {message}")

    def _timeout_error(self, name: str, limit: float | None) -> LuaTimeoutError:
        if self.should_stop is not None and self.should_stop():
            return LuaTimeoutError(f"{name}: Lua code was stopped (cancelled)")
        if limit is not None:
            return LuaTimeoutError(f"{name}: Lua code ran past its {limit:g}s timeout")
        return LuaTimeoutError(f"{name}: Lua code was stopped")

    def _memory_error(self, name: str) -> LuaMemoryError:
        limit = "no limit" if self.max_memory is None else f"max_memory={self.max_memory}"
        return LuaMemoryError(f"{name}: not enough memory ({limit})")

    @staticmethod
    def _to_lua(value: Any, root: str) -> bytes | None:
        if value is None:
            return None
        try:
            return to_lua_bytes(value, root)
        except ConversionError as exc:
            raise LuaConversionError(str(exc)) from exc


def _for_lua(method: Callable[..., Any]) -> Any:
    """``method`` wrapped as the sandbox receives it (it only ever calls it).

    lupa looks up ``__getitem__`` on any other object it hands Lua, to choose
    how Lua indexes it; on a method that lookup fails, building and dropping
    an AttributeError, about half of what handing a VM a callable costs.
    Naming the protocol up front skips the lookup; calls work as before.
    """
    return lua54.as_attrgetter(method)


def _crosses_lazily(state: Any) -> bool:
    """Whether ``state`` goes to Lua one top-level value at a time, on first read.

    Only a non-empty dict whose keys are all plain strings: then Lua's ``#``,
    ``rawlen`` and ``ipairs`` never depend on a value not yet read. A key
    that is not valid text fails here, before Lua runs, as it always did.
    """
    if type(state) is not dict or not state:
        return False
    for key in state:
        if type(key) is not str:
            return False
        error = state_key_error(key)
        if error is not None:
            raise LuaConversionError(str(error))
    return True


def _lua_message(raw: Any) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    # lupa appends a Lua traceback to errors it raises; the first line is the message.
    return text.split("\nstack traceback:", 1)[0]
