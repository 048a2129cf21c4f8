"""The run-level cancellation signal: one object a run checks and its waits listen to.

An async caller runs the (synchronous) run in another thread; cancelling
the awaiting task cannot close a generator that is executing there. Instead
the caller sets the run's ``CancelSignal``: the runner checks it between
steps, main-path Lua polls it from its hook, and every built-in backend
registers a callback that wakes its blocking wait, so the wait raises
``RunCancelled`` and the backend's own early-stop path (the one a consumer
closing the stream takes) stops the branches.

``RunCancelled`` is a ``BaseException`` but not an ``Exception``: no
``except Exception`` in a node wrapper, a branch or a backend turns a
cancellation into an ordinary failure.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from .errors import RunCancelled


class CancelSignal:
    """Set once, from any thread; read cheaply; waited on; heard through callbacks.

    ``cancel()`` sets the signal and calls every registered callback once
    (in the cancelling thread, so callbacks must only wake something up:
    put to a queue, write to a pipe, notify a condition). A callback added
    after ``cancel()`` is called at once. What a cancelled wait raises is an
    ``error_type`` (default ``RunCancelled``); a branch's own signal raises
    ``BranchCancelled``, which makes the branch's result a cancelled one.
    Cheap to make (one lock; the event behind ``wait`` is made on first wait),
    so every branch has one.
    """

    __slots__ = ("_callbacks", "_event", "_lock", "_set", "error_type", "reason")

    def __init__(self, reason: str = "the run was cancelled",
                 error_type: type[BaseException] = RunCancelled) -> None:
        self._set = False
        self._event: threading.Event | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason = reason
        self.error_type = error_type

    def cancel(self, reason: str | None = None) -> None:
        """Set the signal and wake everything listening to it. Safe to call twice."""
        with self._lock:
            if self._set:
                return
            if reason:
                self.reason = reason
            self._set = True
            callbacks, self._callbacks = self._callbacks, []
            event = self._event
        if event is not None:
            event.set()
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        """Whether ``cancel()`` was called."""
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds for ``cancel()``; True if the signal is set.

        A backoff or any other pause inside a run waits with this instead
        of ``time.sleep``, so a cancellation ends the pause at once.
        """
        with self._lock:
            if self._set:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` on cancellation (now, if already cancelled).

        Returns a function that unregisters it; call that when the wait the
        callback wakes is over.
        """
        with self._lock:
            if not self._set:
                self._callbacks.append(callback)
                return lambda: self._remove(callback)
        callback()
        return _nothing

    def _remove(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):  # already called
            self._callbacks.remove(callback)

    def error(self) -> BaseException:
        """The exception a cancelled wait raises."""
        return self.error_type(self.reason)

    def raise_if_set(self) -> None:
        """Raise ``error()`` if the signal is set."""
        if self._set:
            raise self.error_type(self.reason)


def _nothing() -> None:
    return None
