"""Backends written to the first protocol, wrapped so the engine sees an ``IsolationBackend``.

The first protocol was an object with a ``name``, ``run_branches(tasks)``
returning one result per task in task order, and ``close()``; later ones
could also offer ``stream_branches(tasks, *, max_concurrency)``, and declare
``crosses_processes``, ``cancellable`` (``stream_branches`` takes
``cancel=``), ``accepts_not_ready`` and ``check_branch_max_memory``. The
registry wraps such a backend once, when it is created; what it declares is
read then, and nowhere else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..branch import BranchTask, ParallelFlowResult
from ..branch_retry import NotReady
from ..cancellation import CancelSignal
from .base import IsolationBackend, set_waker, wait_until_ready

# Chunk size for a list-returning backend that declares no max_workers.
DEFAULT_LEGACY_CHUNK = max(os.cpu_count() or 1, 8)


def adapt(backend: Any) -> IsolationBackend:
    """``backend`` (of the first protocol) as an ``IsolationBackend``."""
    if callable(getattr(backend, "stream_branches", None)):
        return StreamingAdapter(backend)
    return ListAdapter(backend)


class _Adapter(IsolationBackend):
    """What both adapters read from the wrapped backend when they are made."""

    def __init__(self, backend: Any) -> None:
        self.wrapped = backend
        self.name = backend.name
        # Undeclared: the backend predates the attribute and runs branches here.
        self.crosses_processes = bool(getattr(backend, "crosses_processes", False))
        self.max_workers = getattr(backend, "max_workers", None)
        self._check_memory: Callable[[int], str | None] | None = getattr(
            backend, "check_branch_max_memory", None)

    def check_branch_max_memory(self, limit: int) -> str | None:
        """What the wrapped backend says, or the default refusal if it says nothing."""
        if self._check_memory is None:
            return super().check_branch_max_memory(limit)
        return self._check_memory(limit)

    def close(self) -> None:
        """Close the wrapped backend."""
        self.wrapped.close()


class StreamingAdapter(_Adapter):
    """A backend with its own ``stream_branches``.

    One that does not declare ``cancellable = True`` is stopped when its
    next result arrives after a cancellation; one that does not declare
    ``accepts_not_ready = True`` is given finite task sources only.
    """

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self._cancellable = getattr(backend, "cancellable", False) is True
        self.accepts_not_ready = getattr(backend, "accepts_not_ready", False) is True

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """The wrapped backend's stream, stopped by ``cancel`` as well as it can be."""
        stream = self.wrapped.stream_branches
        if cancel is None:
            return stream(tasks, max_concurrency=max_concurrency)
        if self._cancellable:
            return stream(tasks, max_concurrency=max_concurrency, cancel=cancel)
        return _checked(stream(tasks, max_concurrency=max_concurrency), cancel)


class ListAdapter(_Adapter):
    """A backend with only ``run_branches``: called on successive chunks of
    ``max_concurrency`` tasks (default: its ``max_workers``), so it runs map
    fan-outs lazily, chunk by chunk. A retry waiting (``NotReady``) is waited
    for between chunks."""

    accepts_not_ready = True

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Results chunk by chunk; a set ``cancel`` stops before the next chunk."""
        size = max_concurrency or self.max_workers or DEFAULT_LEGACY_CHUNK
        return _chunked(self.wrapped, iter(tasks), size, cancel)


def _checked(stream: Iterator[tuple[int, ParallelFlowResult]], cancel: CancelSignal
             ) -> Iterator[tuple[int, ParallelFlowResult]]:
    try:
        for pair in stream:
            cancel.raise_if_set()
            yield pair
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _chunked(backend: Any, tasks: Iterator[BranchTask], size: int,
             cancel: CancelSignal | None = None) -> Iterator[tuple[int, ParallelFlowResult]]:
    position = 0
    woken = threading.Event()
    set_waker(tasks, woken.set)
    forget = cancel.add_callback(woken.set) if cancel is not None else None
    try:
        while True:
            chunk: list[BranchTask] = []
            while len(chunk) < size:
                task = next(tasks, None)
                if task is None:
                    break
                if isinstance(task, NotReady):
                    if chunk:
                        break  # run what is ready; the rest is asked for after it
                    wait_until_ready(task, woken)  # nothing runs meanwhile
                    if cancel is not None:
                        cancel.raise_if_set()
                    continue
                chunk.append(task)
            if not chunk:
                return
            if cancel is not None:
                cancel.raise_if_set()
            results = backend.run_branches(chunk)
            if len(results) != len(chunk):
                raise RuntimeError(f"backend {backend.name!r} returned {len(results)} results "
                                   f"for {len(chunk)} branches")
            for result in results:
                yield position, result
                position += 1
    finally:
        if forget is not None:
            forget()
