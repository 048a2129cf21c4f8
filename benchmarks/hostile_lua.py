"""A seeded generator of hostile Lua programs: each one tries to outlive its time limit.

``hostile_program(seed)`` composes, up to ``MAX_DEPTH`` levels deep, the
constructs a program can use to keep running after its deadline: every kind
of loop and recursion, ``pcall``/``xpcall`` (message handlers that loop, raise
or call ``pcall`` again), coroutines (created, resumed, wrapped, yielded,
closed, kept in a pool and resumed only after time is up), metamethods whose
bodies are hostile sub-programs, ``string.gsub``/``table.sort``/``load``
callbacks, and error values whose metamethods loop.

Every program's outer driver loops for ever and catches every error, so the
only way a program can end is the time limit. What a generated program never
does is one single long C call (a pathological pattern, a huge sort with the
default comparator): no count hook can interrupt one, and the runtime says so.
The same seed always gives the same program.
"""

from __future__ import annotations

import random
from collections.abc import Callable

MAX_DEPTH = 4
# The coroutine pool is bounded so that no program ends with an out-of-memory
# error instead of a timeout.
POOL_LIMIT = 300
# What a __tostring body ends with: tostring() insists on a string.
RETURN_TEXT = 'return "e"'


class _Composer:
    """Builds one program from one random stream."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counter = 0
        self.constructs: list[Callable[[int], str]] = [
            # loops and recursion
            self.while_loop, self.repeat_loop, self.numeric_for, self.generic_for,
            self.goto_loop, self.tail_recursion, self.deep_recursion,
            # protected calls
            self.pcall_block, self.nested_pcall, self.xpcall_block, self.xpcall_retrying,
            self.raise_error_value, self.catch_and_use_error_value, self.catch_and_rethrow,
            # coroutines
            self.resume_new, self.wrap_new, self.resume_until_dead, self.yield_ping_pong,
            self.close_with_close_variable, self.pool_add, self.pool_fill, self.pool_drain,
            self.drain_after_time_is_up, self.fill_then_drain_after_time_is_up,
            self.resume_running,
            # metamethods
            self.metamethod, self.metamethod, self.metamethod, self.close_variable,
            # callbacks of library functions
            self.gsub_callback, self.sort_comparator, self.load_reader, self.load_text,
        ]

    # -- helpers ------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def block(self, depth: int) -> str:
        """One or two statements, each at most ``MAX_DEPTH - depth`` constructs deep."""
        count = 1 if self.rng.random() < 0.6 else 2
        return " ".join(self.statement(depth) for _ in range(count))

    def statement(self, depth: int) -> str:
        if depth >= MAX_DEPTH or self.rng.random() < 0.15 + 0.1 * depth:
            return self.leaf()
        return self.rng.choice(self.constructs)(depth + 1)

    def function(self, depth: int, tail: str = "") -> str:
        return f"function(...) {self.block(depth)} {tail} end"

    def error_value(self, depth: int) -> str:
        """A table raised as an error, whose metamethods are hostile sub-programs."""
        events = self.rng.sample(["__tostring", "__index", "__concat", "__eq", "__len", "__call"],
                                 self.rng.randint(1, 3))
        fields = ", ".join(
            f"{event} = {self.function(depth, RETURN_TEXT if event == '__tostring' else '')}"
            for event in events)
        return f"setmetatable({{}}, {{{fields}}})"

    def leaf(self) -> str:
        label = self.name("leaf")
        return self.rng.choice([
            "while true do end",
            "repeat until false",
            "for _ = 1, math.huge do end",
            f"do ::{label}:: goto {label} end",
            f"do local function {label}() return {label}() end {label}() end",
            'error("boom")',
            "error(setmetatable({}, {__tostring = function() while true do end end}))",
            'do local _ = string.rep("x", 100000) end',
            # Costly instructions: a thread that gets a full hook interval
            # after time is up then runs for tens of milliseconds.
            'while true do local _ = string.rep("x", 100000) end',
            "for _ = 1, 1000 do local _ = {} end",
            "if coroutine.isyieldable() then coroutine.yield() end",
            "coroutine.yield()",
            "pcall(error)",
            "do local _ = tostring({}) end",
            'do local _ = string.find(string.rep("a", 2000), "b") end',
            "do local s = 0 for i = 1, 10000 do s = s + i end end",
        ])

    # -- loops and recursion ------------------------------------------------

    def while_loop(self, depth: int) -> str:
        return f"while true do {self.block(depth)} end"

    def repeat_loop(self, depth: int) -> str:
        return f"repeat {self.block(depth)} until false"

    def numeric_for(self, depth: int) -> str:
        limit = self.rng.choice(["math.huge", "1e9", "3"])
        return f"for _ = 1, {limit} do {self.block(depth)} end"

    def generic_for(self, depth: int) -> str:
        return f"for _ in function() return true end do {self.block(depth)} end"

    def goto_loop(self, depth: int) -> str:
        label = self.name("top")
        return f"do ::{label}:: do {self.block(depth)} end goto {label} end"

    def tail_recursion(self, depth: int) -> str:
        name = self.name("tail")
        return (f"do local function {name}(n) {self.block(depth)} return {name}(n + 1) end "
                f"{name}(0) end")

    def deep_recursion(self, depth: int) -> str:
        # Not a tail call: ends in a stack overflow error unless its body loops.
        name = self.name("deep")
        return (f"do local function {name}(n) {self.block(depth)} return 1 + {name}(n + 1) end "
                f"{name}(0) end")

    # -- protected calls ----------------------------------------------------

    def pcall_block(self, depth: int) -> str:
        return f"pcall({self.function(depth)})"

    def nested_pcall(self, depth: int) -> str:
        return f"pcall(pcall, pcall, {self.function(depth)})"

    def handler(self, depth: int) -> str:
        return self.rng.choice([
            f"function(e) {self.block(depth)} return e end",
            "function(e) while true do end end",
            "function(e) error(e) end",
            f"function(e) pcall({self.function(depth)}) return e end",
            "function(e) return e end",
        ])

    def xpcall_block(self, depth: int) -> str:
        return f"xpcall({self.function(depth)}, {self.handler(depth)})"

    def xpcall_retrying(self, depth: int) -> str:
        body, handler = self.name("body"), self.name("handler")
        return (f"do local {body} = {self.function(depth)} local {handler} "
                f"{handler} = function(e) return xpcall({body}, {handler}) end "
                f"xpcall({body}, {handler}) end")

    def raise_error_value(self, depth: int) -> str:
        return f"error({self.error_value(depth)})"

    def catch_and_use_error_value(self, depth: int) -> str:
        use = self.rng.choice(["tostring(e)", "e .. \"x\"", "e.field", "#e", "e()", "e == e"])
        return (f"do local ok, e = pcall(error, {self.error_value(depth)}) "
                f"local _ = {use} end")

    def catch_and_rethrow(self, depth: int) -> str:
        # Catches whatever the body raised (the timeout too) and raises it again.
        return f"do local ok, e = pcall({self.function(depth)}) if not ok then error(e, 0) end end"

    # -- coroutines ---------------------------------------------------------

    def resume_new(self, depth: int) -> str:
        return f"coroutine.resume(coroutine.create({self.function(depth)}))"

    def wrap_new(self, depth: int) -> str:
        return self.rng.choice([f"coroutine.wrap({self.function(depth)})()",
                                f"pcall(coroutine.wrap({self.function(depth)}))"])

    def resume_until_dead(self, depth: int) -> str:
        co = self.name("co")
        return (f"do local {co} = coroutine.create({self.function(depth)}) "
                f"while coroutine.resume({co}) do end end")

    def yield_ping_pong(self, depth: int) -> str:
        co = self.name("co")
        return (f"do local {co} = coroutine.wrap(function() while true do {self.block(depth)} "
                f"coroutine.yield() end end) for _ = 1, 20 do {co}() end end")

    def close_with_close_variable(self, depth: int) -> str:
        co = self.name("co")
        return (f"do local {co} = coroutine.create(function() local x <close> = "
                f"setmetatable({{}}, {{__close = {self.function(depth)}}}) {self.block(depth)} end) "
                f"coroutine.resume({co}) coroutine.close({co}) end")

    def pool_add(self, depth: int) -> str:
        return (f"if #POOL < {POOL_LIMIT} then POOL[#POOL + 1] = "
                f"coroutine.create({self.function(depth)}) end")

    def pool_fill(self, depth: int) -> str:
        return (f"for _ = 1, 100 do if #POOL < {POOL_LIMIT} then POOL[#POOL + 1] = "
                f"coroutine.create({self.function(depth)}) end end")

    def pool_drain(self, depth: int) -> str:
        return self.rng.choice([
            "for _, c in ipairs(POOL) do coroutine.resume(c) end",
            "while #POOL > 0 do coroutine.resume(table.remove(POOL)) end",
            "for _, c in ipairs(POOL) do pcall(coroutine.close, c) end",
        ])

    def drain_after_time_is_up(self, depth: int) -> str:
        # Waits in a coroutine until the deadline ends it, then wakes the pool:
        # each pooled coroutine has not run since time was up.
        return (f"do coroutine.resume(coroutine.create({self.function(depth)})) "
                f"while #POOL > 0 do coroutine.resume(table.remove(POOL)) end end")

    def fill_then_drain_after_time_is_up(self, depth: int) -> str:
        return f"{self.pool_fill(depth)} {self.drain_after_time_is_up(depth)}"

    def resume_running(self, depth: int) -> str:
        return ("do local co, main = coroutine.running() "
                f"if not main then pcall(coroutine.resume, co) end {self.block(depth)} end")

    # -- metamethods --------------------------------------------------------

    def metamethod(self, depth: int) -> str:
        event, use = self.rng.choice([
            ("__index", "local _ = t.x"), ("__newindex", "t.x = 1"), ("__call", "t()"),
            ("__tostring", "local _ = tostring(t)"), ("__eq", "local _ = t == u"),
            ("__lt", "local _ = t < u"), ("__le", "local _ = t <= u"),
            ("__concat", 'local _ = t .. "x"'), ("__len", "local _ = #t"),
            ("__unm", "local _ = -t"),
        ])
        body = self.function(depth, RETURN_TEXT if event == "__tostring" else "")
        return (f"do local mt = {{{event} = {body}}} local t, u = setmetatable({{}}, mt), "
                f"setmetatable({{}}, mt) {use} end")

    def close_variable(self, depth: int) -> str:
        return (f"do local x <close> = setmetatable({{}}, {{__close = {self.function(depth)}}}) "
                f"{self.block(depth)} end")

    # -- callbacks ----------------------------------------------------------

    def gsub_callback(self, depth: int) -> str:
        return f'string.gsub(string.rep("a", 20), "a", {self.function(depth)})'

    def sort_comparator(self, depth: int) -> str:
        return (f"table.sort({{5, 3, 1, 4, 2, 6, 8, 7}}, function(a, b) {self.block(depth)} "
                f"return a < b end)")

    def load_reader(self, depth: int) -> str:
        return (f"do local f = load(function() {self.block(depth)} return nil end) "
                f"if f then f() end end")

    def load_text(self, depth: int) -> str:
        # Long brackets of a level no enclosing string uses.
        level = "=" * depth
        return f"do local f = load([{level}[ {self.block(depth)} ]{level}]) if f then f() end end"

    # -- the whole program --------------------------------------------------

    def program(self) -> str:
        main = self.block(0)
        driver = self.rng.choice([
            "while true do pcall(main) end",
            "repeat xpcall(main, function(e) return e end) until false",
            "while true do coroutine.resume(coroutine.create(function() pcall(main) end)) end",
            "while true do pcall(coroutine.wrap(main)) end",
            "for _ = 1, math.huge do local ok, e = pcall(main) if not ok then pcall(error, e) end "
            "end",
            'while true do pcall(string.gsub, "aaaa", "a", main) end',
            "while true do pcall(table.sort, {3, 1, 2}, function(a, b) main() return a < b end) "
            "end",
        ])
        return f"POOL = {{}}\nlocal function main(...) {main} end\n{driver}\n"


def hostile_program(seed: int | str) -> str:
    """The hostile Lua program for ``seed`` (always the same text for the same seed)."""
    return _Composer(random.Random(f"isobranch-hostile-lua:{seed}")).program()
