"""The checkpoint store's part in interrupts: schema 3 (paused branches, pending interrupts,
answers), a version 2 database brought to it."""

from __future__ import annotations

import sqlite3

from isobranch import SqliteCheckpointer
from isobranch.checkpoint import RunStatus
from isobranch.checkpoint.store import SCHEMA_VERSION

VERSION_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '2');
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, graph TEXT, fingerprint TEXT NOT NULL, input TEXT NOT NULL,
    status TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL, final_state TEXT,
    error TEXT, worked REAL NOT NULL DEFAULT 0, span_started REAL, last_active REAL);
CREATE TABLE steps (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL, kind TEXT NOT NULL,
    steps INTEGER NOT NULL, state TEXT NOT NULL, recorded_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq));
CREATE TABLE fan_outs (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, node TEXT NOT NULL, total INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq));
CREATE TABLE branches (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, position INTEGER NOT NULL,
    success INTEGER NOT NULL, result TEXT NOT NULL, PRIMARY KEY (run_id, seq, position));
INSERT INTO runs VALUES ('old', 'g', 'fp', '{}', 'running', 1.0, NULL, NULL, NULL, 0, 1.0, 2.0);
INSERT INTO fan_outs VALUES ('old', 1, 'start', 2);
INSERT INTO branches VALUES ('old', 1, 0, 1, '{}');
"""


def test_a_version_2_database_gets_paused_branches_and_interrupt_tables(tmp_path):
    path = tmp_path / "v2.db"
    connection = sqlite3.connect(path)
    connection.executescript(VERSION_2)
    connection.commit()
    connection.close()
    store = SqliteCheckpointer(path)
    [old] = store.list_runs()
    assert (old.run_id, old.status, old.branches_done) == ("old", RunStatus.RUNNING, 1)
    assert store._read("SELECT value FROM meta WHERE key = 'schema'") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == "3"
    assert store.paused_branches("old", 1) == []
    assert store.pending_interrupts("old") == [] and store.answer_records("old") == {}
    store.write_branches([("old", 1, 1, False, "{}", True)])
    assert store.paused_branches("old", 1) == [(1, "{}")]
    store.reopen_run("old", None, [("ask[1]", '"yes"')])
    assert store.answer_records("old") == {"ask[1]": '"yes"'}
    assert store.delete_run("old")
    assert store.answer_records("old") == {}
