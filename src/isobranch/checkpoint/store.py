"""``SqliteCheckpointer``: the run database (standard-library sqlite3, WAL mode).

Every write is one ``BEGIN IMMEDIATE`` transaction, so a writer takes the
database's write lock before it reads anything and never has to upgrade a
read lock (which SQLite refuses at once, busy timeout or not). Waiting for
a lock held by another thread or process is SQLite's busy timeout, and a
"locked" or "busy" error that still gets through is retried with backoff:
many threads and processes may share one file without the user ever
seeing "database is locked".

A run's working time is the sum of the spans it actually ran: each start
or resume opens a span, and every write of the run also stamps the run's
``last_active`` time in the same transaction, so a span ended by a kill
(SIGKILL leaves no chance to record an end) still counts up to its last
record, and the time between a kill and the resume never does.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from ..errors import GraphError, RunExistsError, StateDecodeError
from ..interrupts import Interrupt
from ..sqlite_retry import open_connection, retry_while_locked
from .codec import decode_value

SCHEMA_VERSION = "3"
# What ``SqliteCheckpointer().path`` is for runs kept in memory.
MEMORY_PATH = ":memory:"
# Version 1 had no working time, version 2 no interrupts; both are brought to
# version 3 when opened.
_NO_WORKING_TIME_VERSION = "1"
_NO_INTERRUPTS_VERSION = "2"
# The wall clock run times are recorded with (tests put their own in its place).
_clock = time.time
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, graph TEXT, fingerprint TEXT NOT NULL, input TEXT NOT NULL,
    status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, final_state TEXT,
    error TEXT, worked REAL NOT NULL DEFAULT 0, span_started REAL, last_active REAL);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL, kind TEXT NOT NULL,
    steps INTEGER NOT NULL, state TEXT NOT NULL, recorded_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq));
CREATE TABLE IF NOT EXISTS fan_outs (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL, total INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq));
CREATE TABLE IF NOT EXISTS branches (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, position INTEGER NOT NULL,
    success INTEGER NOT NULL, result TEXT NOT NULL, paused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, seq, position));
CREATE TABLE IF NOT EXISTS interrupts (
    run_id TEXT NOT NULL, position INTEGER NOT NULL, id TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (run_id, position));
CREATE TABLE IF NOT EXISTS answers (
    run_id TEXT NOT NULL, id TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, id));
"""


class RunStatus(StrEnum):
    """Where a recorded run stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class StepKind(StrEnum):
    """How a main-path step ran: as a node of its own, as a fan-in node after its branches,
    or inside a subgraph node."""

    NODE = "node"
    FAN_IN = "fan_in"
    # A step inside a main-path subgraph node; its state is the frames from the main path in.
    SUBGRAPH = "subgraph"


@dataclass(frozen=True)
class RunInfo:
    """One recorded run as ``SqliteCheckpointer.list_runs`` describes it.

    ``branches_done`` counts branch results recorded as successful across
    the run's main-path fan-outs, ``branches_total`` their branches.
    Times are seconds since the epoch; ``finished_at`` is None while the
    run is (or was, when killed) running. ``working_time`` is how many
    seconds the run ran: the sum of its spans from a start or resume to the
    end of that attempt, a span ended by a kill counting up to its last
    record; for a run that is running, up to its last record so far.
    """

    run_id: str
    graph: str | None
    status: RunStatus
    started_at: float
    finished_at: float | None
    branches_done: int
    branches_total: int
    error: str | None
    working_time: float = 0.0

    @property
    def duration(self) -> float | None:
        """The working time of a run that ended (None while it is running, or was killed
        running): what it took, not counting the time between a kill and its resume."""
        return None if self.status == RunStatus.RUNNING else self.working_time


@dataclass(frozen=True)
class StepRow:
    """The last recorded main-path step of a run."""

    seq: int
    node: str
    kind: str
    steps: int
    state: str


@dataclass(frozen=True)
class RecordedStep:
    """One recorded main-path step of a run (or an inner step of a subgraph node), with when
    it was recorded (seconds since the epoch)."""

    seq: int
    node: str
    kind: str
    steps: int
    state: str
    recorded_at: float


@dataclass(frozen=True)
class RunRow:
    """A run's own row."""

    run_id: str
    graph: str | None
    fingerprint: str
    input: str
    status: RunStatus
    final_state: str | None


class SqliteCheckpointer:
    """Records runs in the SQLite database at ``path`` so they can be resumed.

    Give it to ``StateGraph.compile(checkpointer=...)``, ``YAMLEngine(
    checkpointer=...)`` or YAML ``settings.checkpoint``. States are stored as
    tagged JSON; ``pickle=True`` also stores (and loads) other values as
    pickles, which lets whoever can write the database run code in this
    process: use it only for a database you trust. One object may serve
    many threads; many processes may share one file.

    Without a ``path`` the runs are kept in memory for the life of the
    object, in this process only (``path`` is then ``:memory:``): enough to
    pause a run with ``interrupt()`` and resume it, nothing survives the
    process. Branches in worker processes never touch the database (only
    the caller records), so every backend may run with one. With
    ``create_directory=True`` the file's directory is made when the
    database is first opened, not before.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 pickle: bool = False, create_directory: bool = False) -> None:
        if path is not None and (not isinstance(path, (str, os.PathLike))
                                 or not os.fspath(path)):
            raise GraphError(f"SqliteCheckpointer: path must be a file path, got {path!r}")
        if not isinstance(pickle, bool):
            raise GraphError(f"SqliteCheckpointer: pickle must be True or False, got {pickle!r}")
        self.pickle = pickle
        # Whether the file's directory is made when the database is first opened (a
        # directory named for checkpoints, as the peer format's config.checkpoint_dir).
        self.create_directory = create_directory
        # An in-memory database: a private shared-cache name, kept alive by a connection
        # of its own as long as this object lives (a shared-cache database ends with
        # its last connection), so close() never loses its runs.
        self._memory_uri: str | None = None
        if path is None:
            self.path = Path(MEMORY_PATH)
            self._memory_uri = f"file:isobranch-{uuid.uuid4().hex}?mode=memory&cache=shared"
            keeper = sqlite3.connect(self._memory_uri, uri=True, check_same_thread=False)
            self._keeper = weakref.finalize(self, keeper.close)
        else:
            self.path = Path(os.fspath(path))
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        if self._memory_uri is not None:
            raise GraphError("an in-memory SqliteCheckpointer() cannot leave its process: "
                             "give it a path to share runs between processes")
        return {"path": self.path, "pickle": self.pickle,
                "create_directory": self.create_directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.pickle = state["path"], state["pickle"]
        self.create_directory = state.get("create_directory", False)
        self._memory_uri = None
        self._reset()

    def __repr__(self) -> str:
        where = "" if self._memory_uri is not None else repr(str(self.path))
        pickled = "pickle=True" if self.pickle else ""
        return f"SqliteCheckpointer({', '.join(filter(None, (where, pickled)))})"

    # -- connection -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # Called with the lock held. A connection never crosses a fork.
        if self._connection is not None and self._pid == os.getpid():
            return self._connection
        self._pid = os.getpid()
        try:
            if self.create_directory and self._memory_uri is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = open_connection(self._memory_uri or self.path, self._prepare,
                                         uri=self._memory_uri is not None)
        except (sqlite3.Error, OSError) as exc:
            raise self._unusable(exc) from exc
        self._connection = connection
        return connection

    def _prepare(self, connection: sqlite3.Connection) -> None:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal" and self._memory_uri is None:  # memory has no WAL
            raise GraphError(f"checkpoint database {str(self.path)!r}: cannot use WAL mode "
                             f"(journal mode stays {mode!r})")
        # WAL with synchronous=NORMAL: a commit survives the process being
        # killed at any moment (only an OS crash or power loss may lose the
        # last commits), and costs no fsync.
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                connection.execute(statement)
            row = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                connection.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] in (_NO_WORKING_TIME_VERSION, _NO_INTERRUPTS_VERSION):
                if row[0] == _NO_WORKING_TIME_VERSION:
                    _add_working_time(connection)
                _add_paused_branches(connection)
            elif row[0] != SCHEMA_VERSION:
                raise GraphError(f"checkpoint database {str(self.path)!r} has schema version "
                                 f"{row[0]!r}; this isobranch reads version {SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise

    def _unusable(self, exc: BaseException) -> GraphError:
        return GraphError(f"checkpoint database {str(self.path)!r} is not usable: "
                          f"{type(exc).__name__}: {exc}")

    def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` in one immediate transaction, retried while the database is locked."""
        def attempt() -> _T:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = work(connection)
                connection.execute("COMMIT")
                return result
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

        with self._lock:
            try:
                return retry_while_locked(attempt)
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise self._unusable(exc) from exc

    def _read(self, query: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return retry_while_locked(lambda: self._connect().execute(query, parameters).fetchall())
            except sqlite3.Error as exc:
                raise self._unusable(exc) from exc

    def close(self) -> None:
        """Close this process's connection (the next use opens a new one)."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    # -- runs -----------------------------------------------------------------

    def list_runs(self) -> list[RunInfo]:
        """Every recorded run, oldest first."""
        return [_run_info(row) for row in self._read(_RUNS_QUERY + " ORDER BY r.started_at, "
                                                     "r.run_id")]

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run ``run_id``, or None if there is none."""
        rows = self._read(_RUNS_QUERY + " WHERE r.run_id = ?", (run_id,))
        return _run_info(rows[0]) if rows else None

    def delete_run(self, run_id: str) -> bool:
        """Forget the run ``run_id`` and everything recorded for it; False if there was none."""
        def work(connection: sqlite3.Connection) -> bool:
            for table in ("branches", "fan_outs", "steps", "interrupts", "answers"):
                connection.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            return connection.execute("DELETE FROM runs WHERE run_id = ?",
                                      (run_id,)).rowcount > 0
        return self._write(work)

    # -- what a recorder uses ---------------------------------------------------

    def create_run(self, run_id: str, graph: str | None, fingerprint: str, input_text: str
                   ) -> None:
        """Record a new run; ``GraphError`` if ``run_id`` exists."""
        def work(connection: sqlite3.Connection) -> None:
            now = _clock()
            connection.execute("INSERT INTO runs (run_id, graph, fingerprint, input, status, "
                               "started_at, span_started, last_active) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (run_id, graph, fingerprint, input_text, RunStatus.RUNNING,
                                now, now, now))
        try:
            self._write(work)
        except sqlite3.IntegrityError as exc:
            raise RunExistsError(run_id, self.path) from exc

    def reopen_run(self, run_id: str, fingerprint: str | None,
                   answers: Iterable[tuple[str, str]] = ()) -> None:
        """Mark a run running again (for a resume); a new ``fingerprint`` replaces the old.

        A run still marked running was killed: its last span counts up to its
        last record. The resume opens a new span. Its pending interrupts are
        answered: ``answers`` (``(interrupt id, value text)``) join the ones
        recorded before, and nothing is pending any more.
        """
        answers = list(answers)

        def work(connection: sqlite3.Connection) -> None:
            now = _clock()
            connection.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                                   [(run_id, id_, text) for id_, text in answers])
            connection.execute("DELETE FROM interrupts WHERE run_id = ?", (run_id,))
            connection.execute(
                "UPDATE runs SET worked = worked + CASE WHEN status = ? THEN "
                "MAX(COALESCE(last_active, span_started) - span_started, 0) ELSE 0 END, "
                "span_started = ?, last_active = ?, status = ?, finished_at = NULL, "
                "error = NULL, fingerprint = COALESCE(?, fingerprint) WHERE run_id = ?",
                (RunStatus.RUNNING, now, now, RunStatus.RUNNING, fingerprint, run_id))
        self._write(work)

    def load_run(self, run_id: str) -> RunRow | None:
        """A run's own row, or None."""
        rows = self._read("SELECT run_id, graph, fingerprint, input, status, final_state "
                          "FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        run_id, graph, fingerprint, input_text, status, final = rows[0]
        return RunRow(run_id, graph, fingerprint, input_text, _status(status), final)

    def last_step(self, run_id: str) -> StepRow | None:
        """The run's last recorded main-path step, or None if no step was recorded."""
        rows = self._read("SELECT seq, node, kind, steps, state FROM steps WHERE run_id = ? "
                          "ORDER BY seq DESC LIMIT 1", (run_id,))
        return StepRow(*rows[0]) if rows else None

    def recorded_steps(self, run_id: str) -> list[RecordedStep]:
        """Every recorded step of the run, oldest first."""
        return [RecordedStep(*row) for row in self._read(
            "SELECT seq, node, kind, steps, state, recorded_at FROM steps WHERE run_id = ? "
            "ORDER BY seq", (run_id,))]

    def fan_out_total(self, run_id: str, seq: int) -> int | None:
        """How many branches the fan-out after step ``seq`` has; None if it never started."""
        rows = self._read("SELECT total FROM fan_outs WHERE run_id = ? AND seq = ?",
                          (run_id, seq))
        return rows[0][0] if rows else None

    def fork_run(self, source: str, run_id: str, *, seq: int, input_text: str,
                 state_text: str | None) -> None:
        """Record run ``run_id`` as a copy of run ``source`` up to its step ``seq``, whose
        state becomes ``state_text`` (``seq`` 0: no step; ``input_text`` is the new run's
        input). The copy is paused (``interrupted``), to be resumed; ``source`` is only read.
        One transaction: the fork is recorded whole or not at all. ``RunExistsError`` if
        ``run_id`` exists."""
        def work(connection: sqlite3.Connection) -> None:
            now = _clock()
            created = connection.execute(
                "INSERT INTO runs (run_id, graph, fingerprint, input, status, started_at, "
                "finished_at, span_started, last_active) SELECT ?, graph, fingerprint, ?, ?, "
                "?, ?, ?, ? FROM runs WHERE run_id = ?",
                (run_id, input_text, RunStatus.INTERRUPTED, now, now, now, now, source))
            if created.rowcount == 0:
                raise GraphError(f"run {source!r} is no longer in {str(self.path)!r}")
            connection.execute(
                "INSERT INTO steps SELECT ?, seq, node, kind, steps, state, recorded_at "
                "FROM steps WHERE run_id = ? AND seq < ?", (run_id, source, seq))
            if state_text is not None:
                connection.execute(
                    "INSERT INTO steps SELECT ?, seq, node, kind, steps, ?, ? FROM steps "
                    "WHERE run_id = ? AND seq = ?", (run_id, state_text, now, source, seq))
        try:
            self._write(work)
        except sqlite3.IntegrityError as exc:
            raise RunExistsError(run_id, self.path) from exc

    def write_step(self, run_id: str, seq: int, node: str, kind: str, steps: int,
                   state_text: str) -> None:
        """Record a main-path step and the state after it."""
        def work(connection: sqlite3.Connection) -> None:
            now = _clock()
            connection.execute("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (run_id, seq, node, kind, steps, state_text, now))
            _mark_active(connection, (run_id,), now)
        self._write(work)

    def write_fan_out(self, run_id: str, seq: int, node: str, total: int) -> None:
        """Record that the fan-out after step ``seq`` has ``total`` branches."""
        def work(connection: sqlite3.Connection) -> None:
            connection.execute("INSERT OR REPLACE INTO fan_outs VALUES (?, ?, ?, ?)",
                               (run_id, seq, node, total))
            _mark_active(connection, (run_id,), _clock())
        self._write(work)

    def write_branches(self, rows: Iterable[tuple[str, int, int, bool, str, bool]]) -> None:
        """Record branch results ``(run_id, seq, position, success, result_text, paused)`` at
        once (``paused``: the branch waits for answers; a resume continues it)."""
        rows = list(rows)

        def work(connection: sqlite3.Connection) -> None:
            connection.executemany("INSERT OR REPLACE INTO branches (run_id, seq, position, "
                                   "success, result, paused) VALUES (?, ?, ?, ?, ?, ?)", rows)
            _mark_active(connection, {row[0] for row in rows}, _clock())
        self._write(work)

    def successful_branches(self, run_id: str, seq: int) -> list[tuple[int, str]]:
        """``(position, result_text)`` of every successful branch recorded for a fan-out."""
        return self._read("SELECT position, result FROM branches WHERE run_id = ? AND seq = ? "
                          "AND success = 1 ORDER BY position", (run_id, seq))

    def paused_branches(self, run_id: str, seq: int) -> list[tuple[int, str]]:
        """``(position, result_text)`` of every branch of a fan-out recorded as paused."""
        return self._read("SELECT position, result FROM branches WHERE run_id = ? AND seq = ? "
                          "AND paused = 1 ORDER BY position", (run_id, seq))

    def pending_interrupt_records(self, run_id: str) -> list[str]:
        """The record text of each interrupt the run ``run_id`` waits for, in order."""
        return [row[0] for row in self._read(
            "SELECT record FROM interrupts WHERE run_id = ? ORDER BY position", (run_id,))]

    def pending_interrupts(self, run_id: str) -> list[Interrupt]:
        """The interrupts the run ``run_id`` waits for (empty unless it is ``interrupted``).

        Each value is decoded as the run's states are; ``GraphError`` for a
        record that is not readable.
        """
        pending = []
        for text in self.pending_interrupt_records(run_id):
            try:
                pending.append(Interrupt.from_record(decode_value(text,
                                                                  allow_pickle=self.pickle)))
            except (StateDecodeError, ValueError, TypeError, RecursionError) as exc:
                raise GraphError(f"run {run_id!r} in {str(self.path)!r}: a recorded interrupt "
                                 f"is unreadable: {exc}") from exc
        return pending

    def answer_records(self, run_id: str) -> dict[str, str]:
        """Every answer given to the run ``run_id``'s interrupts: ``{id: value text}``."""
        return dict(self._read("SELECT id, value FROM answers WHERE run_id = ?", (run_id,)))

    def finish_run(self, run_id: str, status: RunStatus, final_text: str | None,
                   error: str | None, interrupts: Sequence[tuple[str, str]] = ()) -> None:
        """Record how a run ended; its span of work ends now. ``interrupts`` (``(id,
        record text)``) are what an interrupted run waits for."""
        def work(connection: sqlite3.Connection) -> None:
            now = _clock()
            connection.execute("DELETE FROM interrupts WHERE run_id = ?", (run_id,))
            connection.executemany("INSERT INTO interrupts VALUES (?, ?, ?, ?)",
                                   [(run_id, position, id_, text)
                                    for position, (id_, text) in enumerate(interrupts)])
            ended = connection.execute(
                "UPDATE runs SET status = ?, finished_at = ?, final_state = ?, error = ?, "
                "worked = worked + MAX(? - COALESCE(span_started, ?), 0), last_active = ? "
                "WHERE run_id = ?", (status, now, final_text, error, now, now, now, run_id))
            if ended.rowcount == 0:
                raise GraphError(f"run {run_id!r} is no longer in the database: it was "
                                 f"deleted while it ran")
        self._write(work)


_RUNS_QUERY = (
    "SELECT r.run_id, r.graph, r.status, r.started_at, r.finished_at, "
    "(SELECT COUNT(*) FROM branches b WHERE b.run_id = r.run_id AND b.success = 1), "
    "(SELECT COALESCE(SUM(f.total), 0) FROM fan_outs f WHERE f.run_id = r.run_id), r.error, "
    "r.worked + CASE WHEN r.status = 'running' THEN "
    "MAX(COALESCE(r.last_active, r.span_started) - r.span_started, 0) ELSE 0 END "
    "FROM runs r")


def _status(text: str) -> RunStatus:
    try:
        return RunStatus(text)
    except ValueError:
        raise GraphError(f"checkpoint database: unknown run status {text!r}") from None


def _run_info(row: tuple) -> RunInfo:
    run_id, graph, status, started, finished, done, total, error, worked = row
    return RunInfo(run_id, graph, _status(status), started, finished, done, total, error,
                   worked or 0.0)


def _mark_active(connection: sqlite3.Connection, run_ids: Iterable[str], now: float) -> None:
    """Stamp the runs as working at ``now``, inside the transaction of what they recorded.

    A run that is gone (deleted while it ran) fails the transaction, so
    nothing is recorded for it that a later run of the same id could take
    for its own.
    """
    for run_id in run_ids:
        if connection.execute("UPDATE runs SET last_active = ? WHERE run_id = ?",
                              (now, run_id)).rowcount == 0:
            raise GraphError(f"run {run_id!r} is no longer in the database: it was deleted "
                             f"while it ran")


def _add_working_time(connection: sqlite3.Connection) -> None:
    """Bring a version 1 database to version 2 (inside ``_prepare``'s transaction).

    Version 1 kept no spans: a run that ended is taken to have worked from
    its start to its end, one still running up to its last recorded step.
    """
    for column in ("worked REAL NOT NULL DEFAULT 0", "span_started REAL", "last_active REAL"):
        connection.execute(f"ALTER TABLE runs ADD COLUMN {column}")
    connection.execute(
        "UPDATE runs SET span_started = started_at, "
        "last_active = COALESCE(finished_at, (SELECT MAX(s.recorded_at) FROM steps s "
        "WHERE s.run_id = runs.run_id), started_at), "
        "worked = COALESCE(finished_at - started_at, 0)")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))


def _add_paused_branches(connection: sqlite3.Connection) -> None:
    """Bring a version 2 database to version 3 (inside ``_prepare``'s transaction): branches
    may be paused (its interrupts and answers tables are new, created with the schema)."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(branches)")}
    if "paused" not in columns:  # (a database without branches got the new table just now)
        connection.execute("ALTER TABLE branches ADD COLUMN paused INTEGER NOT NULL DEFAULT 0")
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))

