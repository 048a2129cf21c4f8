"""The isolation backend protocol and the registry of backends by name."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import BackendError, ConfigError, ConfigTypeError, GraphError, InternalError

if TYPE_CHECKING:
    from ..branch import BranchTask, ParallelFlowResult
    from ..cancellation import CancelSignal


@runtime_checkable
class IsolationBackend(Protocol):
    """Where the branches of a fan-out run.

    ``run_branches`` returns one result per task, in task order, and never
    raises for a failing branch. ``close`` releases every worker it owns.

    ``crosses_processes`` says whether branches run in another process
    (the state must then pickle; the runner checks that before the fan-out
    and names what does not). Every built-in backend sets it; one that does
    not is taken to run branches in this process (``crosses_processes()``;
    it is not a member here, so ``isinstance`` still accepts such a backend).

    A backend may also offer ``stream_branches`` (see ``StreamingBackend``);
    the runner then sees results as they finish. Without it the runner calls
    ``run_branches`` on chunks of ``max_concurrency`` tasks.
    """

    name: str

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingBackend(Protocol):
    """A backend that runs a lazy stream of tasks and reports each result as it finishes.

    ``stream_branches`` pulls tasks from ``tasks`` only as it can start them
    (never more than ``max_concurrency`` started and unfinished; None: the
    backend's worker count) and yields ``(position in tasks, result)`` in
    completion order. It applies no fail-fast rule (the runner does). When
    the consumer closes the generator early, queued branches are dropped and
    running ones stopped before ``close()`` of the generator returns.

    A backend whose class sets ``cancellable = True`` also takes
    ``cancel=`` (a ``CancelSignal`` or None): when it is set, the stream
    raises ``RunCancelled`` from its wait at once and stops its branches as
    on an early close.
    """

    name: str

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]: ...


class NotReady:
    """What a task source may yield in place of a task: no task is ready yet.

    A fan-out whose failed branches wait to be retried hands its backend a
    source that is not finished while a retry waits. ``wake_at`` is when
    the next task will be ready (``time.monotonic()``), or None: not before
    the backend hands back another result (some are still running). A
    backend that declares ``accepts_not_ready = True`` then starts nothing
    for now, keeps reporting running branches, and asks the source again
    at ``wake_at`` or after its next result. A source that has a
    ``set_waker(callback)`` method is told how to end that wait early (the
    fan-out was stopped); the callback may be called from any thread. A
    source never answers ``NotReady`` before its first task.
    """

    __slots__ = ("wake_at",)

    def __init__(self, wake_at: float | None) -> None:
        self.wake_at = wake_at

    def __repr__(self) -> str:
        return f"NotReady(wake_at={self.wake_at!r})"


def accepts_not_ready(backend: Any) -> bool:
    """Whether ``backend``'s streaming takes a source that may answer ``NotReady``.

    True for the built-in backends, and for one with only ``run_branches``
    (it is driven chunk by chunk here). A third-party ``stream_branches``
    without the declaration gets finite sources only.
    """
    if not callable(getattr(backend, "stream_branches", None)):
        return True
    return getattr(backend, "accepts_not_ready", False) is True


def crosses_processes(backend: Any) -> bool:
    """Whether ``backend`` runs branches in other processes (so the state must pickle).

    The built-in backends declare it; a third-party backend that predates
    the attribute runs its branches here.
    """
    return bool(getattr(backend, "crosses_processes", False))


def set_waker(tasks: Any, callback: Callable[[], None]) -> None:
    """Tell ``tasks`` how to wake the backend waiting on it, if it wants to know."""
    hook = getattr(tasks, "set_waker", None)
    if callable(hook):
        hook(callback)


def wait_until_ready(marker: NotReady, woken: threading.Event) -> None:
    """For a backend with nothing running: wait until ``marker.wake_at`` or ``woken``."""
    if marker.wake_at is None:
        raise InternalError("the task source waits for a result, but no branch is running")
    woken.wait(max(marker.wake_at - time.monotonic(), 0.0))
    woken.clear()


# Chunk size for a backend that has neither stream_branches nor max_workers.
DEFAULT_LEGACY_CHUNK = max(os.cpu_count() or 1, 8)


def stream_results(backend: IsolationBackend, tasks: Iterable[BranchTask],
                   max_concurrency: int | None, cancel: CancelSignal | None = None
                   ) -> Iterator[tuple[int, ParallelFlowResult]]:
    """``(position, result)`` pairs of ``tasks`` run on ``backend``, as they finish.

    Uses the backend's ``stream_branches`` when it has one; otherwise calls
    its ``run_branches`` on successive chunks of ``max_concurrency`` tasks
    (default: its ``max_workers``), so a backend that only returns lists
    keeps working, lazily, chunk by chunk. A set ``cancel`` stops the
    stream: at once on a ``cancellable`` backend, otherwise when the next
    result (or chunk) arrives.
    """
    stream = getattr(backend, "stream_branches", None)
    if callable(stream):
        if cancel is None:
            return stream(tasks, max_concurrency=max_concurrency)
        if getattr(backend, "cancellable", False):
            return stream(tasks, max_concurrency=max_concurrency, cancel=cancel)
        return _checked(stream(tasks, max_concurrency=max_concurrency), cancel)
    return _chunked(backend, iter(tasks), max_concurrency or getattr(backend, "max_workers", None)
                    or DEFAULT_LEGACY_CHUNK, cancel)


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


def _chunked(backend: IsolationBackend, tasks: Iterator[BranchTask], size: int,
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
                raise BackendError(f"backend {backend.name!r} returned {len(results)} results "
                                   f"for {len(chunk)} branches")
            for result in results:
                yield position, result
                position += 1
    finally:
        if forget is not None:
            forget()


BackendFactory = Callable[..., IsolationBackend]

# The one global registry the project allows: backend name -> factory.
_registry: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory(max_workers=..., **options)`` available as ``isolation=name``.

    Registering a name twice is an error unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("backend name must be a non-empty string")
    if not callable(factory):
        raise ConfigTypeError(f"backend {name!r}: factory must be callable")
    if name in _registry and not replace and _registry[name] is not factory:
        raise ConfigError(f"backend {name!r} is already registered (pass replace=True)")
    _registry[name] = factory


def available_backends() -> list[str]:
    """Names accepted as ``isolation``, sorted."""
    _ensure_builtins()
    return sorted(_registry)


def backend_factory(name: str) -> BackendFactory | None:
    """The factory registered as ``name`` (None if there is none)."""
    _ensure_builtins()
    return _registry.get(name)


def create_backend(name: str, **options: Any) -> IsolationBackend:
    """Build a backend by name; unknown names and options are a ``GraphError``."""
    _ensure_builtins()
    factory = _registry.get(name)
    if factory is None:
        raise GraphError(f"unknown isolation backend {name!r}; available: "
                         f"{', '.join(sorted(_registry))}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise GraphError(f"isolation backend {name!r}: {exc}") from exc


# Always registered: ``unregister_backend`` refuses them (``replace=True`` swaps one).
BUILTIN_BACKENDS = frozenset({"inline", "thread", "process", "dask"})


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name``, so a test's registration does not outlive it.

    Unknown and built-in names are a ``ValueError``. Graphs already compiled
    for ``name`` keep the pools they have.
    """
    if name in BUILTIN_BACKENDS:
        raise ConfigError(f"backend {name!r} is built in and cannot be unregistered "
                         f"(register_backend({name!r}, factory, replace=True) replaces it)")
    if name not in _registry:
        raise ConfigError(f"no isolation backend {name!r} is registered")
    del _registry[name]


def _ensure_builtins() -> None:
    # Imported lazily so the registry module has no import cycle with them.
    from . import dask, inline, process, thread  # noqa: F401
