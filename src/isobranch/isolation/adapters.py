"""Backends written to the first protocols, wrapped so the driver sees an ``IsolationBackend``.

The first protocol was an object with a ``name``, ``run_branches(tasks)``
returning one result per task in task order, and ``close()``. Later ones
could offer ``stream_branches(tasks, *, max_concurrency)`` instead, which
pulls tasks lazily and yields ``(position, result)`` as each finishes, and
declare ``crosses_processes``, ``cancellable`` (``stream_branches`` takes
``cancel=``), ``accepts_not_ready`` (its task source may answer
``NotReady``) and ``check_branch_max_memory``. The registry wraps such a
backend once, when it creates it; what it declares is read then, and
nowhere else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..branch import BranchRun, BranchTask, ParallelFlowResult
from ..cancellation import CancelSignal, RunCancelled
from ..errors import BackendError
from .base import BackendFanOut, Finished, IsolationBackend, RunSource

if TYPE_CHECKING:
    from ..branch import BranchGraph

# Chunk size for a list-returning backend that declares no max_workers.
DEFAULT_LEGACY_CHUNK = max(os.cpu_count() or 1, 8)


def adapt(backend: Any) -> IsolationBackend:
    """``backend`` (of the first protocols) as an ``IsolationBackend``."""
    if callable(getattr(backend, "stream_branches", None)):
        return StreamingAdapter(backend)
    return ListAdapter(backend)


class NotReady:
    """What the task source of a backend that declares ``accepts_not_ready = True`` may
    yield in place of a task: no task is ready yet (a failed branch waits to be retried).

    ``wake_at`` is when the next task will be ready (``time.monotonic()``),
    or None: not before the backend hands back another result. The backend
    starts nothing for it, keeps running and reporting its branches, and
    asks again then. The source's ``set_waker(callback)`` is given a
    function that ends that wait early, from any thread. A source never
    answers ``NotReady`` before its first task.
    """

    __slots__ = ("wake_at",)

    def __init__(self, wake_at: float | None) -> None:
        self.wake_at = wake_at

    def __repr__(self) -> str:
        return f"NotReady(wake_at={self.wake_at!r})"


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


class ListAdapter(_Adapter):
    """A backend with only ``run_branches``: called on successive chunks of as many runs
    as the driver allows at once (``max_concurrency``, default its ``max_workers``), so
    it runs a map lazily, chunk by chunk. A cancellation stops it before its next chunk."""

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """Chunks of the fan-out's runs."""
        return _Chunks(self, source)


class _Chunks(BackendFanOut):
    def __init__(self, adapter: ListAdapter, source: RunSource) -> None:
        self.slots = adapter.max_workers or DEFAULT_LEGACY_CHUNK
        self._backend = adapter.wrapped
        self._source = source
        self._woken = threading.Event()

    def start(self) -> None:
        """Nothing starts ahead: ``collect`` runs each chunk."""

    def collect(self, timeout: float | None) -> list[Finished]:
        """Run the next chunk (what the source gives now); with none, wait for a retry."""
        chunk: list[BranchRun] = []
        while (run := self._source.take()) is not None:
            chunk.append(run)
        if not chunk:
            self._woken.wait(timeout)
            self._woken.clear()
            return []
        results = self._backend.run_branches([run.task for run in chunk])
        if len(results) != len(chunk):
            raise BackendError(f"backend {self._backend.name!r} returned {len(results)} "
                               f"results for {len(chunk)} branches")
        return list(zip(chunk, results, strict=True))

    def wake(self) -> None:
        """End a wait for a retry."""
        self._woken.set()


class StreamingAdapter(_Adapter):
    """A backend with its own ``stream_branches``, handed ``max_concurrency``.

    Its stream pulls tasks from the driver. One that does not declare
    ``accepts_not_ready = True`` is given finite task sources: while
    retries wait, its stream ends, and the fan-out goes on in rounds, each
    starting when a retry is due. One that does not declare ``cancellable =
    True`` is stopped when its next result arrives after a cancellation.
    """

    bounds_concurrency = True

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.cancellable = getattr(backend, "cancellable", False) is True
        self.accepts_not_ready = getattr(backend, "accepts_not_ready", False) is True

    def open(self, source: RunSource, graph: BranchGraph) -> BackendFanOut:
        """The wrapped backend's stream, round by round."""
        return _Rounds(self, source)


class _StreamTasks:
    """The task source one round of a wrapped stream pulls from."""

    def __init__(self, source: RunSource, accepts_not_ready: bool) -> None:
        self._source = source
        self._accepts_not_ready = accepts_not_ready
        self.handed: list[BranchRun] = []
        self.returned = 0
        self.waker: Callable[[], None] | None = None

    def __iter__(self) -> _StreamTasks:
        return self

    def __next__(self) -> BranchTask | NotReady:
        run = self._source.take()
        if run is not None:
            self.handed.append(run)
            return run.task
        if self._accepts_not_ready and self.handed:
            due = self._source.next_due()
            if due is not None:
                return NotReady(due)
            if self.returned < len(self.handed):
                return NotReady(None)
        raise StopIteration

    def set_waker(self, callback: Callable[[], None]) -> None:
        """Called by the wrapped backend: how to end its wait for a task early."""
        self.waker = callback


class _Rounds(BackendFanOut):
    def __init__(self, adapter: StreamingAdapter, source: RunSource) -> None:
        self.slots = adapter.max_workers or 1
        self._adapter = adapter
        self._source = source
        self._tasks: _StreamTasks | None = None
        self._stream: Iterator[tuple[int, ParallelFlowResult]] | None = None
        self._woken = threading.Event()
        # Passed to a cancellable stream; set when the run is cancelled.
        self._cancel = CancelSignal()

    def start(self) -> None:
        """Start a round of the wrapped stream when none runs and runs are ready."""
        if self._stream is not None or not self._source.ready():
            return
        adapter = self._adapter
        self._tasks = _StreamTasks(self._source, adapter.accepts_not_ready)
        stream = adapter.wrapped.stream_branches
        limit = self._source.max_concurrency
        self._stream = (stream(self._tasks, max_concurrency=limit, cancel=self._cancel)
                        if adapter.cancellable else stream(self._tasks, max_concurrency=limit))

    def collect(self, timeout: float | None) -> list[Finished]:
        """The stream's next result; with no round running, wait for a retry."""
        if self._stream is None or self._tasks is None:
            self._woken.wait(timeout)
            self._woken.clear()
            return []
        try:
            position, result = next(self._stream)
        except StopIteration:
            self._stream = None  # the round is over
            return []
        except RunCancelled:
            return []  # the driver raises the run's own error
        handed = self._tasks.handed
        if not isinstance(position, int) or not 0 <= position < len(handed):
            raise BackendError(f"backend {self._adapter.name!r} reported a result for task "
                               f"{position!r} of {len(handed)} it was given")
        self._tasks.returned += 1
        return [(handed[position], result)]

    def wake(self) -> None:
        """End a wait for a retry, and the wrapped stream's wait for a task."""
        self._woken.set()
        tasks = self._tasks
        if tasks is not None and tasks.waker is not None:
            tasks.waker()

    def interrupt(self) -> None:
        """Stop a cancellable stream at once."""
        self._cancel.cancel()
        self.wake()

    def close(self, *, cancelled: bool) -> None:
        """Close the round still running: the wrapped backend stops its branches."""
        stream, self._stream = self._stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()
