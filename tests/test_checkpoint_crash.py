"""Crash safety: SIGKILL and Ctrl-C of the caller at random moments of a map, then resume.

Each round starts ``checkpoint_agents.py map`` (a 200-item map on the process
backend) in a process group of its own, waits for a random number of its
branch events plus a random pause, and kills the whole group (SIGKILL) or
presses Ctrl-C (SIGINT to the group, as a terminal does). After every round
the database must pass ``PRAGMA integrity_check``, and no branch whose
success was recorded before a round may have run in it (branches leave a
file per execution). A last round runs to the end; its final state must
equal that of an uninterrupted run, and every item must have run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

AGENTS = Path(__file__).with_name("checkpoint_agents.py")
ITEMS = 200
RUN_ID = "crash-test"


class Harness:
    """Runs rounds of the map program against one database and checks each one."""

    def __init__(self, tmp_path: Path, seed: int) -> None:
        self.random = random.Random(seed)
        self.database = tmp_path / "runs.db"
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.result = tmp_path / "final.json"
        self.kills = 0
        self.kills_mid_map = 0  # kills that left some results recorded and some not

    def command(self, database: Path, marks: Path, result: Path) -> list[str]:
        return [sys.executable, str(AGENTS), "map", str(database), RUN_ID, str(marks),
                str(ITEMS), str(result)]

    def reference(self, tmp_path: Path) -> dict:
        marks = tmp_path / "reference-marks"
        marks.mkdir()
        result = tmp_path / "reference.json"
        subprocess.run(self.command(tmp_path / "reference.db", marks, result), check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        return _without_marks(json.loads(result.read_text()))

    def recorded(self) -> set[int]:
        if not self.database.exists():
            return set()
        with sqlite3.connect(self.database) as connection:
            rows = connection.execute("SELECT position FROM branches WHERE run_id = ? AND "
                                      "success = 1", (RUN_ID,)).fetchall()
        return {position for (position,) in rows}

    def executions(self) -> list[str]:
        return sorted(path.name for path in self.marks.iterdir())

    def round(self, stop: signal.Signals | None) -> int:
        """One run of the program, stopped by ``stop`` after a random moment; its exit code."""
        recorded_before = self.recorded()
        ran_before = set(self.executions())
        killed = False
        child = subprocess.Popen(self.command(self.database, self.marks, self.result),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        try:
            if stop is not None:
                remaining = ITEMS - len(recorded_before)
                wait_for = self.random.randint(0, max(remaining // 3, 1))
                seen = 0
                assert child.stdout is not None
                while seen <= wait_for:  # the "run" line, then branch lines
                    if not child.stdout.readline():
                        break  # it finished first
                    seen += 1
                time.sleep(self.random.uniform(0, 0.01))
                if child.poll() is None:
                    os.killpg(child.pid, stop)
                    self.kills += stop == signal.SIGKILL
                    killed = True
            _, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        self.check_database()
        if killed and 0 < len(self.recorded()) < ITEMS:
            self.kills_mid_map += 1
        again = {int(name.split(".")[0]) for name in set(self.executions()) - ran_before}
        assert not again & recorded_before, (
            f"items {sorted(again & recorded_before)} ran again although their results "
            f"were recorded")
        if stop is None or child.returncode == 0:
            assert child.returncode == 0, err.decode(errors="replace")
        return child.returncode

    def check_database(self) -> None:
        if not self.database.exists():
            return
        with sqlite3.connect(self.database) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    def status(self) -> str | None:
        with sqlite3.connect(self.database) as connection:
            row = connection.execute("SELECT status FROM runs WHERE run_id = ?",
                                     (RUN_ID,)).fetchone()
        return row[0] if row else None

    def finish(self, reference: dict) -> None:
        assert self.round(None) == 0
        assert _without_marks(json.loads(self.result.read_text())) == reference
        ran = {int(name.split(".")[0]) for name in self.executions()}
        assert ran == set(range(ITEMS)), "every item ran"
        assert self.status() == "succeeded"


def _without_marks(state: dict) -> dict:
    # The one key that differs between the reference run and the one under test.
    return {key: value for key, value in state.items() if key != "marks"}


def kill_rounds(tmp_path: Path, kills: int) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")  # shown when the test fails, to replay its moments
    harness = Harness(tmp_path, seed)
    reference = harness.reference(tmp_path)
    attempts = 0
    while harness.kills < kills:
        attempts += 1
        assert attempts < kills * 3, "the program kept finishing before it could be killed"
        code = harness.round(signal.SIGKILL)
        if code == 0:  # it finished before the moment came: start over on a fresh run
            harness.finish(reference)
            harness = _fresh(harness, tmp_path, seed + attempts)
    assert harness.kills_mid_map >= kills // 2, "most kills must land inside the map"
    harness.finish(reference)


def _fresh(old: Harness, tmp_path: Path, seed: int) -> Harness:
    kills = old.kills
    base = tmp_path / f"again-{seed}"
    base.mkdir()
    harness = Harness(base, seed)
    harness.kills, harness.kills_mid_map = kills, old.kills_mid_map
    return harness


@pytest.mark.timeout(300)  # about 15 s alone; a loaded machine may take several times that
def test_sigkill_of_the_caller_at_ten_random_moments_then_resume(tmp_path):
    kill_rounds(tmp_path, kills=10)


@pytest.mark.stress
@pytest.mark.timeout(900)
def test_sigkill_soak_forty_moments(tmp_path):
    kill_rounds(tmp_path, kills=40)


@pytest.mark.timeout(300)
def test_ctrl_c_records_interrupted_and_resume_finishes(tmp_path):
    harness = Harness(tmp_path, random.randrange(1 << 30))
    reference = harness.reference(tmp_path)
    interrupted = 0
    for _ in range(6):
        code = harness.round(signal.SIGINT)
        if code == 0:
            break
        assert code == 130, f"Ctrl-C must end the program as interrupted, got exit {code}"
        assert harness.status() == "interrupted"
        interrupted += 1
        if interrupted == 3:
            break
    assert interrupted >= 1
    harness.finish(reference)
