"""``SqliteCache``: the node cache's file (standard-library sqlite3, WAL mode).

One file may serve threads, worker processes, Dask workers on the same
machine and pytest-xdist workers at once: it is opened in WAL mode with
SQLite's busy timeout, every statement is retried while another connection
holds a lock (sqlite_retry.py), and an entry is written by one statement in
one ``BEGIN IMMEDIATE`` transaction, so a reader sees a whole entry or none.
A ``SqliteCache`` pickles as its path: a worker process opens the file
itself on first use.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import GraphError
from .sqlite_retry import open_connection, retry_while_locked

# What the meta table of a node cache file says it is.
FORMAT = "isobranch-node-cache"
FORMAT_VERSION = "1"
# The wall clock entries expire by (tests put their own in its place).
_clock = time.time
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, node TEXT NOT NULL, value TEXT NOT NULL,
    stored_at REAL NOT NULL, expires_at REAL)
"""


class SqliteCache:
    """The node cache in the SQLite file at ``path`` (created on first use).

    Give it to ``StateGraph.compile(cache=...)`` or ``YAMLEngine(cache=...)``
    (YAML: ``settings.cache: {path: cache.db}``); nodes with a
    ``CachePolicy`` then return a stored update instead of running again
    on the same input. A file that is not an isobranch node cache (corrupt,
    or another program's database) is a ``GraphError`` naming the path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise GraphError(f"SqliteCache: path must be a file path, got {path!r}")
        self.path = Path(os.fspath(path))
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._reset()

    def __repr__(self) -> str:
        return f"SqliteCache({str(self.path)!r})"

    def get(self, key: str) -> str | None:
        """The stored value of ``key`` (encoded text), or None if absent or expired."""
        rows = self._run(lambda connection: connection.execute(
            "SELECT value, expires_at FROM entries WHERE key = ?", (key,)).fetchall())
        if not rows:
            return None
        value, expires_at = rows[0]
        if expires_at is not None and expires_at <= _clock():
            return None
        return value

    def put(self, key: str, node: str, value: str, ttl: float | None) -> None:
        """Store ``value`` (encoded text) under ``key`` for ``ttl`` seconds (None: no end)."""
        now = _clock()
        expires_at = None if ttl is None else now + ttl

        def write(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                                   (key, node, value, now, expires_at))
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

        self._run(write)

    def __len__(self) -> int:
        """How many entries the file holds (expired ones too, until overwritten)."""
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def clear(self) -> None:
        """Drop every entry."""
        self._run(lambda connection: connection.execute("DELETE FROM entries"))

    def close(self) -> None:
        """Close this process's connection (the next use opens a new one)."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            try:
                return retry_while_locked(lambda: work(self._connect()))
            except sqlite3.Error as exc:
                raise self._unusable(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        # Called with the lock held. A connection never crosses a fork.
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        self._pid = os.getpid()
        connection = open_connection(self.path, self._prepare)
        self._connection = connection
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise GraphError(f"node cache {str(self.path)!r}: cannot use WAL mode "
                             f"(journal mode stays {mode!r})")
        # A lost last entry (OS crash) only costs a node run; no fsync per entry.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables - {"meta", "entries"} or ("meta" in tables) != ("entries" in tables):
                raise self._foreign(f"it holds tables {', '.join(sorted(tables))}")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                connection.execute(statement)
            found = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            if not tables:
                connection.executemany("INSERT INTO meta VALUES (?, ?)",
                                       [("format", FORMAT), ("version", FORMAT_VERSION)])
            elif found.get("format") != FORMAT:
                raise self._foreign("its meta table does not name the isobranch node cache")
            elif found.get("version") != FORMAT_VERSION:
                raise GraphError(f"node cache {str(self.path)!r} has format version "
                                 f"{found.get('version')!r}; this isobranch reads version "
                                 f"{FORMAT_VERSION} (delete the file to start a new cache)")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _foreign(self, why: str) -> GraphError:
        return GraphError(f"node cache {str(self.path)!r} is not an isobranch node cache ({why}); "
                          f"give the cache a file of its own")

    def _unusable(self, exc: BaseException) -> GraphError:
        return GraphError(f"node cache {str(self.path)!r} is not usable: "
                          f"{type(exc).__name__}: {exc}")
