"""``isobranch run -v/-vv``: the package's log records on stderr, never on stdout."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch.cli import main

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "examples" / "fan_out_demo.yaml"

# A node that logs one record at each level under an ``isobranch.*`` logger.
LOGGING_FLOW = """
    settings: {parallel: {isolation: inline}}
    nodes:
      - name: talk
        run: |
          import logging
          logger = logging.getLogger("isobranch.test_node")
          logger.debug("debug from the node")
          logger.info("info from the node")
          logger.warning("warning from the node")
          return {"talked": True}
"""


@pytest.fixture
def logging_flow(tmp_path: Path) -> Path:
    path = tmp_path / "talk.yaml"
    path.write_text(textwrap.dedent(LOGGING_FLOW), encoding="utf-8")
    return path


def _isobranch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isobranch", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=plain_environment())


def test_run_vv_shows_a_debug_record_on_stderr_and_nothing_extra_on_stdout() -> None:
    quiet = _isobranch("run", str(DEMO), "--input", '{"items": [4, 8, 15]}')
    verbose = _isobranch("run", "-vv", str(DEMO), "--input", '{"items": [4, 8, 15]}')
    assert quiet.returncode == verbose.returncode == 0, verbose.stderr
    assert f"isobranch: DEBUG: isobranch.cli: loaded {DEMO} (6 nodes)" in verbose.stderr.splitlines()
    assert "DEBUG" not in quiet.stderr
    assert verbose.stdout == quiet.stdout
    assert json.loads(verbose.stdout)["total"] == 27


def test_records_never_mix_into_the_stream_lines() -> None:
    result = _isobranch("run", str(DEMO), "-vv", "--stream", "--input", '{"items": [1]}')
    assert result.returncode == 0, result.stderr
    assert "isobranch: DEBUG:" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    assert events[-1]["type"] == "final"


@pytest.mark.parametrize(("flags", "shown", "hidden"), [
    ((), ["WARNING"], ["INFO", "DEBUG"]),
    (("-v",), ["WARNING", "INFO"], ["DEBUG"]),
    (("-vv",), ["WARNING", "INFO", "DEBUG"], []),
    (("--verbose", "--verbose", "-v"), ["WARNING", "INFO", "DEBUG"], []),
])
def test_each_v_shows_one_level_more(capfd, logging_flow, flags, shown, hidden) -> None:
    assert main(["run", str(logging_flow), *flags]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out) == {"talked": True}
    for level in shown:
        assert f"isobranch: {level}: isobranch.test_node: {level.lower()} from the node" in err
    for level in hidden:
        assert f"isobranch: {level}:" not in err


def test_the_handler_lives_only_while_the_command_runs(capfd, logging_flow) -> None:
    logger = logging.getLogger("isobranch")
    before = (list(logger.handlers), logger.level)
    assert main(["run", "-vv", str(logging_flow)]) == 0
    assert main(["run", "-vv", str(logging_flow)]) == 0
    assert (list(logger.handlers), logger.level) == before
    err = capfd.readouterr().err
    assert err.count("debug from the node") == 2  # once per run, not once per handler left behind


def test_validate_and_graph_take_verbose_too(capfd) -> None:
    assert main(["validate", "-vv", str(DEMO)]) == 0
    assert f"isobranch: DEBUG: isobranch.cli: validated {DEMO} (0 problems)" in capfd.readouterr().err
    assert main(["graph", "-v", str(DEMO)]) == 0
    out, err = capfd.readouterr()
    assert out.startswith("flowchart TD") and "DEBUG" not in err


def test_importing_the_package_installs_no_handler() -> None:
    code = ("import logging, isobranch, isobranch.cli, isobranch.regression; "
            "print(logging.getLogger('isobranch').handlers, logging.getLogger().handlers)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[] []"
