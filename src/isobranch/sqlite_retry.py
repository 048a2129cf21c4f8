"""Sharing one SQLite file between threads and processes without "database is locked".

Both SQLite stores of isobranch (the checkpointer, checkpoint/store.py, and
the node cache, cache_store.py) open their file with SQLite's busy timeout
(``BUSY_TIMEOUT_SECONDS``: SQLite itself waits that long for a lock held by
another connection) and run every statement through ``retry_while_locked``:
a "locked" or "busy" error that still gets through (SQLite gives up at once
when waiting could deadlock) is retried with a growing, jittered pause, so
the user never sees it.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# How long SQLite itself waits for a lock, and how long a locked statement is retried after that.
BUSY_TIMEOUT_SECONDS = 30.0
RETRY_SECONDS = 600.0
_T = TypeVar("_T")


def is_lock_error(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says another connection holds a lock (worth waiting for)."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def retry_while_locked(attempt: Callable[[], _T], *, within: float = RETRY_SECONDS) -> _T:
    """``attempt()``, again after a pause while SQLite says the database is locked or busy."""
    deadline = time.monotonic() + within
    pause = 0.005
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            if not is_lock_error(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, 0.5)


def open_connection(target: str | Path, prepare: Callable[[sqlite3.Connection], None], *,
                    uri: bool = False) -> sqlite3.Connection:
    """A connection to ``target`` for any thread, in autocommit mode with the busy timeout,
    once ``prepare`` (its pragmas and schema) succeeded on it, retried while locked.

    A connection ``prepare`` failed on is closed, never returned half-set-up.
    """
    connection = sqlite3.connect(target, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                                 check_same_thread=False, uri=uri)
    try:
        retry_while_locked(lambda: prepare(connection))
    except BaseException:
        connection.close()
        raise
    return connection
