"""PipeWaker: the one self-pipe that ends a wait on file descriptors from another thread."""

from __future__ import annotations

import os
import select
import threading

from isobranch.cancellation import CancelSignal
from isobranch.isolation.wakeup import PipeWaker


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_wake_makes_it_readable_and_clear_forgets():
    waker = PipeWaker()
    try:
        assert not readable(waker.fileno())
        waker.wake()
        waker.wake()
        assert readable(waker.fd)
        waker.clear()
        assert not readable(waker.fd)
    finally:
        waker.close()


def test_a_full_pipe_never_blocks_the_waking_thread():
    waker = PipeWaker()
    try:
        for _ in range(70_000):  # more than a pipe's buffer (64 KiB on Linux)
            waker.wake()
        assert readable(waker.fd)
    finally:
        waker.close()


def test_a_signal_wakes_it_and_the_condition_it_also_notifies():
    signal, condition = CancelSignal(), threading.Condition()
    waiting, outcome = threading.Event(), []
    waker = PipeWaker(signal, also_notify=condition)

    def wait_for_notice():
        with condition:
            waiting.set()
            outcome.append(condition.wait(timeout=30))

    thread = threading.Thread(target=wait_for_notice)
    thread.start()
    try:
        assert waiting.wait(10)
        with condition:  # the waiter holds the lock until it waits
            pass
        signal.cancel("stop")
        thread.join(10)
        assert outcome == [True], "notified, not timed out"
        assert readable(waker.fd)
    finally:
        waker.close()


def test_after_close_a_signal_writes_nowhere_and_close_is_idempotent():
    signal = CancelSignal()
    waker = PipeWaker(signal)
    waker.close()
    waker.close()
    # The lowest free descriptors are reused: a pipe made now has the closed one's numbers.
    read_end, write_end = os.pipe()
    try:
        signal.cancel("late")
        waker.wake()
        assert not readable(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
