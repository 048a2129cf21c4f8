"""``isobranch run`` progress lines: on a terminal's stderr only, never on stdout."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch.progress import FALLBACK_COLUMNS, FALLBACK_ROWS, FanOutProgress, line_width

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "map_documents.yaml"
SOME_FAIL = """
nodes:
  - name: start
    run: |
      return {"items": list(range(10))}
  - name: body
    run: |
      if state["item"] % 3 == 0:
          raise ValueError("multiple of three")
      return {}
  - name: join
    fan_in: true
    run: |
      return {"failed": sum(not r.success for r in parallel_results)}
edges:
  - {from: __start__, to: start}
  - {from: start, to: body, type: map, over: items, fan_in: join}
  - {from: body, to: join}
"""


def run_cli(tmp_path: Path, *args: str, terminal: bool,
            size: tuple[int, int] = (24, 100)) -> tuple[str, str]:
    """Run ``isobranch run ...``; stderr is a pseudo-terminal (``size``: rows, columns) if
    ``terminal``, else a pipe."""
    command = [sys.executable, "-m", "isobranch", "run", *args]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=plain_environment())
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    # stdout goes to a file: a full pipe nobody reads yet would stall the child.
    out_path = tmp_path / "stdout.txt"
    try:
        with open(out_path, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=slave,
                                       stdin=subprocess.DEVNULL, cwd=ROOT,
                                       env=plain_environment())
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert process.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return out_path.read_text(), b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_progress_line_and_stdout_only_the_json(tmp_path):
    stdout, terminal = run_cli(tmp_path, str(EXAMPLE), terminal=True)
    assert "generate -> aggregate" in terminal
    assert "1000/1000" in terminal and "branch/s" in terminal
    final = json.loads(stdout)  # nothing but the final state on stdout
    assert final["documents"] == 1000 and final["failed"] == 0


def test_a_pipe_gets_no_progress(tmp_path):
    stdout, stderr = run_cli(tmp_path, str(EXAMPLE), terminal=False)
    assert stderr == ""
    assert json.loads(stdout)["documents"] == 1000


def test_no_progress_turns_it_off_on_a_terminal(tmp_path):
    stdout, terminal = run_cli(tmp_path, str(EXAMPLE), "--no-progress", terminal=True)
    assert "1000/1000" not in terminal and "branch/s" not in terminal
    assert json.loads(stdout)["documents"] == 1000


def test_progress_forces_it_on_and_counts_failures(tmp_path):
    flow = tmp_path / "some_fail.yaml"
    flow.write_text(SOME_FAIL)
    stdout, stderr = run_cli(tmp_path, str(flow), "--progress", terminal=False)
    assert "10/10" in stderr and "failed=4" in stderr
    assert json.loads(stdout)["failed"] == 4


@pytest.mark.parametrize("terminal", [True, False])
def test_stream_output_stays_clean_json_lines_with_progress(tmp_path, terminal):
    stdout, _ = run_cli(tmp_path, str(EXAMPLE), "--stream", "--progress", terminal=terminal)
    events = [json.loads(line) for line in stdout.splitlines()]
    assert sum(e["type"] == "branch" for e in events) == 1000
    assert events[-1]["type"] == "final"


def test_a_terminal_that_reports_zero_columns_still_gets_the_progress_line(tmp_path,
                                                                           monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    stdout, terminal = run_cli(tmp_path, str(EXAMPLE), terminal=True, size=(0, 0))
    assert "generate -> aggregate" in terminal
    assert "1000/1000" in terminal and "branch/s" in terminal
    last = terminal.replace("\r\n", "\n").split("\r")[-1].strip()
    assert len(last) <= FALLBACK_COLUMNS, "a line as wide as the fallback"
    assert json.loads(stdout)["documents"] == 1000


def _terminal(rows: int, columns: int):
    """A pseudo-terminal of that size, as the file object a progress line is written to."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, os.fdopen(slave, "w")


@pytest.mark.parametrize(("rows", "columns", "environment", "expected"), [
    (30, 120, None, {"dynamic_ncols": True}),
    (0, 0, None, {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}),
    (0, 0, "132", {"ncols": 132, "nrows": FALLBACK_ROWS}),
    (0, 0, "wide", {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}),
    (40, 0, None, {"ncols": FALLBACK_COLUMNS, "nrows": 40}),
])
def test_line_width_follows_the_terminal_or_falls_back(rows, columns, environment, expected,
                                                        monkeypatch):
    if environment is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", environment)
    master, stream = _terminal(rows, columns)
    try:
        assert line_width(stream) == expected
    finally:
        stream.close()
        os.close(master)


def test_a_zero_column_terminal_gets_drawn_lines_in_process(monkeypatch):
    """The same through ``FanOutProgress`` itself: tqdm draws on the 0x0 terminal."""
    monkeypatch.delenv("COLUMNS", raising=False)
    master, stream = _terminal(0, 0)
    try:
        progress = FanOutProgress(stream)
        for done in range(1, 4):
            progress.update({"type": "branch", "fan_out": "split", "fan_in": "join",
                             "success": done != 2, "total": 3})
        progress.update({"type": "parallel", "fan_in": "join"})
        stream.close()
        drawn = _read_all(master)
    finally:
        stream.close()
        os.close(master)
    assert "split -> join" in drawn and "3/3" in drawn and "failed=1" in drawn


def _read_all(master: int) -> str:
    """Everything written to a pseudo-terminal whose other end is closed."""
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: nothing more, the other end is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
