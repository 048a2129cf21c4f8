"""Awaiting what ``async def`` nodes, fan-in nodes, routers and conditions return.

The run is synchronous code; an awaitable a node returns is awaited on an
event loop owned by the node's execution context (one per main path or
branch, created on first use, closed with the context), in the thread or
worker process that runs the node. While it is awaited the context is asked
every ``STOP_POLL_SECONDS`` whether it must stop (run cancelled, branch
cancelled or past its ``branch_timeout``); if so the awaiting task is
cancelled at its current ``await`` and the context's reason is raised.

A thread whose own event loop is running (a synchronous ``invoke()`` called
from inside a coroutine) cannot run a second loop; there the awaitable runs
on a loop in a helper thread, joined before the node returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable
from typing import Any

# How often an awaited node is asked whether it must stop.
STOP_POLL_SECONDS = 0.05


class AwaitRunner:
    """Runs awaitables to completion for one execution context."""

    def __init__(self, stop_reason: Callable[[], BaseException | None]) -> None:
        self._stop_reason = stop_reason
        self._runner: asyncio.Runner | None = None

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` here and return its value (or raise what it raised)."""
        if _loop_running_here():
            return _run_in_helper_thread(self._guarded(awaitable))
        if self._runner is None:
            self._runner = asyncio.Runner()
        # The node's own context (its interrupt scope): a Runner would otherwise run every
        # call in the context it copied when it was made.
        return self._runner.run(self._guarded(awaitable), context=contextvars.copy_context())

    async def _guarded(self, awaitable: Awaitable[Any]) -> Any:
        task = asyncio.ensure_future(awaitable)
        while True:
            done, _ = await asyncio.wait({task}, timeout=STOP_POLL_SECONDS)
            if done:
                return task.result()
            reason = self._stop_reason()
            if reason is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # it failed while being stopped: the stop is what happened
                    pass
                raise reason

    def close(self) -> None:
        """Close the loop: cancel what the node left running, shut async generators down."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.close()


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_helper_thread(coroutine: Any) -> Any:
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()  # a new thread starts with an empty one

    def target() -> None:
        try:
            outcome["value"] = context.run(asyncio.run, coroutine)
        except BaseException as exc:  # handed back to the node's own thread
            outcome["error"] = exc

    helper = threading.Thread(target=target, name="isobranch-async-node", daemon=True)
    helper.start()
    helper.join()
    if "error" in outcome:
        raise outcome.pop("error")
    return outcome["value"]
