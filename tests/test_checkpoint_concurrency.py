"""One checkpoint database used at once by many threads of several processes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from isobranch import SqliteCheckpointer
from isobranch.checkpoint import RunStatus

AGENTS = Path(__file__).with_name("checkpoint_agents.py")
PROCESSES, THREADS, RUNS = 4, 4, 6


def test_four_processes_of_four_threads_share_one_database_without_lock_errors(tmp_path):
    database = tmp_path / "shared.db"  # created by whichever process gets there first
    children = [subprocess.Popen([sys.executable, str(AGENTS), "writers", str(database),
                                  str(THREADS), str(RUNS)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(PROCESSES)]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        assert "locked" not in err and "busy" not in err, err
        assert out.strip() == str(THREADS * RUNS)
    runs = SqliteCheckpointer(database).list_runs()
    assert len(runs) == PROCESSES * THREADS * RUNS
    assert all(run.status is RunStatus.SUCCEEDED for run in runs)
    assert all((run.branches_done, run.branches_total) == (8, 8) for run in runs)
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
