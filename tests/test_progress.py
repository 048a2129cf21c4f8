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


def run_cli(tmp_path: Path, *args: str, terminal: bool) -> tuple[str, str]:
    """Run ``isobranch run ...``; stderr is a pseudo-terminal if ``terminal``, else a pipe."""
    command = [sys.executable, "-m", "isobranch", "run", *args]
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=plain_environment())
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
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
