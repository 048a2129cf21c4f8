"""Running a graph from async code: off the event loop, cancellable.

A run is synchronous code (the runner's generator and the backends' waits).
``ainvoke``/``astream`` run it in a thread of the compiled graph's run pool
and hand its outcome (or events) back to the caller's loop, which never
blocks. Cancelling the awaiting task sets the run's ``CancelSignal``; the
run raises ``RunCancelled`` in its thread at its next check or wait, and its
backend stops the branches. The caller waits up to ``CANCEL_WAIT_SECONDS``
for the run thread to end, then raises ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from .cancellation import CancelSignal
from .errors import GraphExecutionError
from .isolation.thread_pool import DaemonThreadPool

# Runs of one compiled graph in flight at once; more wait for a thread. A run
# mostly waits (on branches, Lua, I/O), so this is not a CPU bound.
MAX_RUN_THREADS = 64
# How long a cancelled call waits for its run to stop before it raises anyway
# (only a Python call that never reaches a node boundary takes that long).
CANCEL_WAIT_SECONDS = 1.0
# Events an ``astream`` run may produce ahead of its consumer before it waits.
STREAM_AHEAD = 32

_CLOSED_MESSAGE = "the compiled graph was closed before this run started"


class RunThreads:
    """The threads that run one compiled graph's async calls, started on demand."""

    def __init__(self, max_threads: int = MAX_RUN_THREADS) -> None:
        self.max_threads = max_threads
        self._lock = threading.Lock()
        self._pool: DaemonThreadPool | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on a run thread; raises if the graph was closed."""
        with self._lock:
            if self._closed:
                raise GraphExecutionError("this compiled graph is closed")
            if self._pool is None:
                self._pool = DaemonThreadPool(self.max_threads, thread_name_prefix="isobranch-run")
            return self._pool.submit(fn, *args)

    @property
    def threads(self) -> list[threading.Thread]:
        """The live run threads."""
        with self._lock:
            return self._pool.threads if self._pool is not None else []

    def close(self, wait: float = CANCEL_WAIT_SECONDS) -> None:
        """Cancel queued runs, end idle threads, and give running ones ``wait`` seconds to end.

        Called after the graph's backends are closed, so a run still going
        fails at its next wait; a thread that has just handed its outcome
        over ends at once.
        """
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait
        me = threading.current_thread()
        for thread in pool.threads:
            if thread is not me:
                thread.join(max(deadline - time.monotonic(), 0.0))


async def run_off_loop(threads: RunThreads, work: Callable[[CancelSignal], Any]) -> Any:
    """``work(cancel)`` on one of ``threads`` (a graph's), awaited without blocking the loop."""
    loop = asyncio.get_running_loop()
    cancel = CancelSignal()
    done = loop.create_future()
    future = threads.submit(work, cancel)
    future.add_done_callback(lambda f: _hand_over(loop, done, f))
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        cancel.cancel("the awaiting task was cancelled")
        await _wait_stopped(done)
        raise


def stream_off_loop(threads: RunThreads, make_events: Callable[[CancelSignal], Iterator[Any]]
                    ) -> AsyncIterator[Any]:
    """The events of ``make_events(cancel)``, produced on one of ``threads``, as an async iterator."""
    return _stream(threads, make_events)


async def _stream(threads: RunThreads, make_events: Callable[[CancelSignal], Iterator[Any]]
                  ) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    cancel = CancelSignal()
    events: asyncio.Queue[Any] = asyncio.Queue()
    credits = threading.Semaphore(STREAM_AHEAD)
    forget = cancel.add_callback(credits.release)  # wakes a producer waiting for credit
    done = loop.create_future()

    def produce(cancel: CancelSignal) -> None:
        stream = make_events(cancel)
        try:
            for event in stream:
                credits.acquire()
                cancel.raise_if_set()
                loop.call_soon_threadsafe(events.put_nowait, event)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    future = threads.submit(produce, cancel)
    future.add_done_callback(lambda f: _hand_over(loop, done, f))
    done.add_done_callback(lambda _: events.put_nowait(_END))
    try:
        while True:
            event = await events.get()
            if event is _END:
                break
            credits.release()
            yield event
        if done.exception() is not None:
            raise done.exception()  # type: ignore[misc]
    finally:
        forget()
        if not done.done():
            # The consumer left early (break, an exception, cancellation): stop the run.
            cancel.cancel("the stream's consumer stopped")
            await _wait_stopped(done)


_END = object()


def call_with_cancel(fn: Callable[..., Any], cancel: CancelSignal, *args: Any,
                     **options: Any) -> Any:
    """``fn(*args, **options)``, handing it the run's signal if it takes a ``_cancel`` keyword."""
    try:
        takes_cancel = "_cancel" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_cancel = False
    if takes_cancel:
        return fn(*args, _cancel=cancel, **options)
    return fn(*args, **options)


def _hand_over(loop: asyncio.AbstractEventLoop, done: asyncio.Future, future: Future) -> None:
    # In the run thread (or the closing one): pass the outcome to the caller's loop.
    # RuntimeError: the caller's loop is closed, nobody waits for this run any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, done, future)


def _settle(done: asyncio.Future, future: Future) -> None:
    if done.done():
        return
    if future.cancelled():
        done.set_exception(GraphExecutionError(_CLOSED_MESSAGE))
    elif future.exception() is not None:
        done.set_exception(future.exception())
    else:
        done.set_result(future.result())


async def _wait_stopped(done: asyncio.Future) -> None:
    """Give a cancelled run up to ``CANCEL_WAIT_SECONDS`` to end; its outcome is dropped."""
    try:
        await asyncio.wait({done}, timeout=CANCEL_WAIT_SECONDS)
    finally:
        if done.done():
            if not done.cancelled():
                done.exception()  # retrieved: a cancelled run's error is not news
        else:
            done.add_done_callback(lambda f: f.cancelled() or f.exception())
