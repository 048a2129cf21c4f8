"""A small pool of daemon worker threads for the thread backend.

``concurrent.futures.ThreadPoolExecutor`` joins its workers when the
interpreter exits, so one Python call that never returns (a branch given up
on at ``branch_timeout``) keeps the whole process alive after its work is
done. This pool's threads are daemon threads: nothing waits for a thread
stuck in a call when the interpreter exits, while ``shutdown`` still ends
and joins every thread that is not running a call, so a closed pool leaves
no idle thread behind.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import BackendError, ConfigError

_WorkItem = tuple[Future, Callable[..., Any], tuple[Any, ...]]


class DaemonThreadPool:
    """Runs submitted calls on up to ``max_workers`` daemon threads, started on demand."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "isobranch-thread") -> None:
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: deque[_WorkItem] = deque()
        self._changed = threading.Condition()
        self._threads: set[threading.Thread] = set()
        self._busy: set[threading.Thread] = set()
        self._waiting = 0
        self._started = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Schedule ``fn(*args)``; its outcome arrives in the returned future."""
        future: Future = Future()
        with self._changed:
            if self._shutdown:
                raise BackendError("cannot submit to a pool that was shut down")
            self._work.append((future, fn, args))
            if len(self._work) > self._waiting and len(self._threads) < self.max_workers:
                self._start_thread()
            self._changed.notify()
        return future

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"{self._prefix}_{self._started}",
                                  daemon=True)
        self._started += 1
        # Tracked once started: a Ctrl-C that interrupts start() must not leave
        # a thread that shutdown() would try to join before it ever ran.
        thread.start()
        self._threads.add(thread)

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            with self._changed:
                self._busy.discard(me)
                while not self._work and not self._shutdown:
                    self._waiting += 1
                    try:
                        self._changed.wait()
                    finally:
                        self._waiting -= 1
                if not self._work:  # shut down and nothing left to run
                    self._threads.discard(me)
                    self._changed.notify_all()
                    return
                future, fn, args = self._work.popleft()
                # Marked under the same lock that hands out the work, so
                # shutdown never mistakes a thread that holds a call for an idle one.
                self._busy.add(me)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args  # a finished call's arguments are not kept alive

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking work and end the threads.

        ``wait=True`` joins every thread after the calls they run return.
        ``wait=False`` does not wait for a running call; with
        ``cancel_futures=True`` (queued calls are cancelled) it still joins
        every thread not running a call, which ends at once. A thread
        running a call ends when the call returns; being a daemon thread, it
        does not keep the interpreter alive.
        """
        with self._changed:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            self._changed.notify_all()
            if wait:
                joining = set(self._threads)
            elif cancel_futures:
                joining = self._threads - self._busy
            else:
                joining = set()
        me = threading.current_thread()
        for thread in joining:
            if thread is not me:
                thread.join()

    @property
    def threads(self) -> list[threading.Thread]:
        """The pool's live threads (idle or running a call)."""
        with self._changed:
            return list(self._threads)
