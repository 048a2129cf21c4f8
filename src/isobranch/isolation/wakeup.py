"""``PipeWaker``: ends a wait on file descriptors at once, from any thread.

A backend that waits on its workers' connections (``select``,
``multiprocessing.connection.wait``) cannot also wait on a condition or an
event; a self-pipe joins the watched descriptors instead, and another
thread writes to it to end the wait: a run being cancelled, a task source
whose retry became due or was stopped.
"""

from __future__ import annotations

import contextlib
import os
import threading

from ..cancellation import CancelSignal


class PipeWaker:
    """A pipe whose read end (``fd``, ``fileno()``) joins the descriptors a wait watches;
    ``wake()``, from any thread, makes it readable.

    Given a ``signal`` (a ``CancelSignal``), setting the signal wakes it,
    until ``close``. ``also_notify``, a condition, is notified on every wake
    too, so a thread waiting on it (for a free worker, say) wakes as well.
    """

    def __init__(self, signal: CancelSignal | None = None,
                 also_notify: threading.Condition | None = None) -> None:
        self.fd, self._write = os.pipe()
        # Non-blocking: a wake never blocks the waking thread, even with the
        # pipe full (a wake-up is pending then anyway), and clear() never waits.
        os.set_blocking(self._write, False)
        os.set_blocking(self.fd, False)
        self._also_notify = also_notify
        # Guards the descriptors: a wake racing close() must not write to a reused fd.
        self._lock = threading.Lock()
        self._closed = False
        self._forget = signal.add_callback(self.wake) if signal is not None else None

    def fileno(self) -> int:
        """The end to wait on: readable once woken."""
        return self.fd

    def wake(self) -> None:
        """End the wait (from any thread); nothing after ``close``."""
        with self._lock, contextlib.suppress(OSError):  # full: a wake-up is pending anyway
            if not self._closed:
                os.write(self._write, b"!")
        if self._also_notify is not None:
            with self._also_notify:
                self._also_notify.notify_all()

    def clear(self) -> None:
        """Forget the wake-ups so far."""
        with self._lock, contextlib.suppress(OSError):  # nothing to read
            if not self._closed:
                os.read(self.fd, 4096)

    def close(self) -> None:
        """Stop listening to the signal and close both ends. Safe to call twice."""
        if self._forget is not None:
            self._forget()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)
            os.close(self._write)
