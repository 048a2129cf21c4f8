"""The README's quick start and CI run the same commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]


def _ci_assignment(script: str, name: str) -> str:
    """The value of ``NAME='...'`` in a shell script, quoting undone (``'"'"'`` is a quote)."""
    match = re.search(rf"^{name}='(.*)'$", script, re.MULTILINE)
    assert match, f".ci/run has no {name}='...' line"
    return match.group(1).replace("'\"'\"'", "'")


def test_quick_start_is_two_commands_from_the_repository_root():
    first, second = _quick_start_commands()
    assert first.startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert ".venv/bin/isobranch run examples/" in first
    assert second.startswith(".venv/bin/pip install -e \".[test]\" && ")
    assert (ROOT / first.split("isobranch run ", 1)[1].split()[0]).is_file()


def test_ci_runs_exactly_the_readme_quick_start_commands():
    first, second = _quick_start_commands()
    script = (ROOT / ".ci" / "run").read_text()
    install, run = _ci_assignment(script, "TEST_INSTALL"), _ci_assignment(script, "TEST_RUN")
    assert f"{install} && {run}" == second
    assert _ci_assignment(script, "QUICK_START") == first
    for name in ("QUICK_START", "TEST_INSTALL", "TEST_RUN"):
        assert f'eval "${name}"' in script
    # A failing test fails CI, and so does a run that collected nothing.
    assert "set -euo pipefail" in script and '"$status" -eq 5' in script


def test_supported_pythons_agree_across_readme_pyproject_and_tox():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    versions = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions == ["3.11", "3.12", "3.13"]
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT")
    tox = (ROOT / "tox.ini").read_text()
    envlist = re.search(r"^envlist = (.*)$", tox, re.MULTILINE).group(1).split(", ")
    assert [e for e in envlist if e.startswith("py")] == [f"py{v.replace('.', '')}"
                                                          for v in versions]
    assert "Python 3.11, 3.12 and 3.13" in (ROOT / "README.md").read_text()


def test_ci_runs_the_suite_without_pythonunbuffered():
    """As on a user's machine, where output lost to buffering would show."""
    script = (ROOT / ".ci" / "run").read_text()
    lines = script.splitlines()
    assert lines.index("unset PYTHONUNBUFFERED") < lines.index('eval "$TEST_RUN"')
