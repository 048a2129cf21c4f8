"""Scratch measurements for the Lua runtime (DESIGN §7): run ``python -m benchmarks.lua_probe``.

Prints VM creation against bare lupa, the timeout hook's hot-loop overhead,
and the 20k-item state round trip. Each pair is measured alternately so
machine drift hits both sides alike; the best of several runs is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import lupa.lua54

from isobranch.lua.runtime import LuaRuntime

HOT_LOOP = """
local s = 0
for i = 1, %d do
  s = s + (i %% 7) * 3 - (i %% 5)
end
return s
"""


def _best_pair(base: Callable[[], object], measured: Callable[[], object],
               repeat: int) -> tuple[float, float]:
    best_base = best_measured = float("inf")
    for _ in range(repeat):
        for fn, which in ((base, 0), (measured, 1)):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if which == 0:
                best_base = min(best_base, elapsed)
            else:
                best_measured = min(best_measured, elapsed)
    return best_base, best_measured


def vm_creation(batch: int = 200, repeat: int = 15) -> tuple[float, float]:
    """Seconds per (bare lupa VM + eval) and per (LuaRuntime() + first execute)."""

    def bare() -> None:
        for _ in range(batch):
            lupa.lua54.LuaRuntime().eval("1")

    def sandboxed() -> None:
        for _ in range(batch):
            LuaRuntime().execute("return 1")

    base, measured = _best_pair(bare, sandboxed, repeat)
    return base / batch, measured / batch


def hook_overhead(iterations: int = 5_000_000, repeat: int = 5) -> tuple[float, float]:
    """Seconds for a hot loop on bare lupa and on a LuaRuntime with the timeout armed."""
    code = HOT_LOOP % iterations
    bare = lupa.lua54.LuaRuntime()
    armed = LuaRuntime(timeout=600.0)
    assert bare.execute(code) == armed.execute(code)
    return _best_pair(lambda: bare.execute(code), lambda: armed.execute(code), repeat)


def round_trip(repeat: int = 7) -> float:
    """Best seconds for ``execute_node_code("return state", state)`` on a 20k-item state."""
    state = {"items": [{"id": i, "name": f"item-{i}", "score": i * 0.5, "tags": ["a", "b"],
                        "ok": i % 2 == 0} for i in range(20_000)]}
    runtime = LuaRuntime()
    assert runtime.execute_node_code("return state", state) == state
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        runtime.execute_node_code("return state", state)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Print the three measurements."""
    bare, sandboxed = vm_creation()
    print(f"VM creation: bare {bare * 1e6:.1f} us, LuaRuntime {sandboxed * 1e6:.1f} us, "
          f"ratio {sandboxed / bare:.2f}x")
    bare, armed = hook_overhead()
    print(f"hot loop: bare {bare * 1e3:.1f} ms, timeout armed {armed * 1e3:.1f} ms, "
          f"ratio {armed / bare:.2f}x")
    print(f"20k-item round trip: {round_trip() * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
