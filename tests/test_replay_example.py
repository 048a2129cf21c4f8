"""examples/regression/reviews.yaml: a recorded model call over HTTP, replayed offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import plain_environment

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "regression"
FILES = ("reviews.yaml", "test_reviews.agent.yaml", "test_reviews.agent.cassette.json",
         "fake_model.py")


def _copy(tmp_path: Path) -> Path:
    for name in FILES:
        shutil.copy(EXAMPLE / name, tmp_path / name)
    return tmp_path


def test_the_example_replays_with_the_service_not_started(tmp_path):
    # No FAKE_MODEL_URL and no service: a `rate` node that ran would fail its case.
    directory = _copy(tmp_path)
    environment = plain_environment()
    environment.pop("FAKE_MODEL_URL", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                             "test_reviews.agent.yaml"], cwd=directory, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_recording_against_the_fake_service_reproduces_the_committed_cassette(tmp_path):
    directory = _copy(tmp_path)
    (directory / "test_reviews.agent.cassette.json").unlink()
    result = subprocess.run([sys.executable, "fake_model.py", "record"], cwd=directory,
                            env=plain_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recorded test_reviews.agent.cassette.json: 2 cases" in result.stdout
    assert ((directory / "test_reviews.agent.cassette.json").read_text(encoding="utf-8")
            == (EXAMPLE / "test_reviews.agent.cassette.json").read_text(encoding="utf-8"))
