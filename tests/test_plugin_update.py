"""``pytest --isobranch-update`` through real pytest runs, under -n 2.

Each test runs an inner pytest session in a subprocess with a user's plain
environment and reads back the case files it rewrote.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("plain_os_environ")

ROOT = Path(__file__).resolve().parents[1]
STATS_AGENT = (ROOT / "tests" / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8")

# Two stale expectations (in two files, so two workers may hold them), one
# to record, one that passes; comments and quoting that must survive.
STALE = """\
# Cases whose expectations went stale.
agent: stats.yaml
cases:
  - name: stale_total
    input: {items: [1, 2]}
    expect:
      verdict: "small: total 4"     # was 4 before the agent changed
      stats: {total: 4, count: 2}

  - name: fine
    input: {items: [5]}
    expect: {verdict: "small: total 5"}
"""
TO_RECORD = """\
agent: stats.yaml
cases:
  - name: new_case
    input: {items: [20, 30]}
    expect: record   # filled in by --isobranch-update
  - name: stale_largest
    input: {items: [3, 9]}
    expect:
      stats: {largest: 3}
"""


def write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_stale.agent.yaml", STALE)
    write(pytester, "test_record.agent.yaml", TO_RECORD)
    return pytester


def test_an_update_run_rewrites_only_the_differing_values_and_passes_them(
        suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-v",
                                        "--isobranch-update")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines_random([
        "*UPDATED test_stale.agent.yaml::stale_total*",
        "*UPDATED test_record.agent.yaml::new_case*",
        "*UPDATED test_record.agent.yaml::stale_largest*",
        "*PASSED test_stale.agent.yaml::fine*",
        "updated test_record.agent.yaml: 2 cases",
        "  new_case: recorded",
        "  stale_largest: stats.largest",
        "updated test_stale.agent.yaml: 1 case",
        "  stale_total: verdict, stats.total",
        "*1 passed, 3 updated*",
    ])
    assert (suite.path / "test_stale.agent.yaml").read_text(encoding="utf-8") == STALE.replace(
        'verdict: "small: total 4"     # was', 'verdict: "small: total 3"     # was').replace(
        "stats: {total: 4, count: 2}", "stats: {total: 3, count: 2}")
    assert (suite.path / "test_record.agent.yaml").read_text(encoding="utf-8") == textwrap.dedent("""\
        agent: stats.yaml
        cases:
          - name: new_case
            input: {items: [20, 30]}
            expect:          # filled in by --isobranch-update
              items: [20, 30]
              stats: {total: 50, count: 2, largest: 30}
              verdict: 'big: total 50'
          - name: stale_largest
            input: {items: [3, 9]}
            expect:
              stats: {largest: 9}
        """)
    # No temporary file is left beside the case files.
    assert not [p.name for p in suite.path.iterdir() if p.name.endswith(".tmp")]
    again = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    assert again.ret == 0
    again.stdout.fnmatch_lines(["*4 passed*"])


def test_without_the_option_expect_record_fails_saying_how_to_record(
        suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rf")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random([
        "expect: record holds no expectation yet; run pytest --isobranch-update to record "
        "this final state",
        "    verdict: 'big: total 50'",
    ])
    assert "expect: record   # filled" in (suite.path / "test_record.agent.yaml").read_text()


def test_cases_that_cannot_be_updated_keep_failing_and_their_files_stay(
        suite: pytest.Pytester) -> None:
    # '~' would come back as 'null': the file does not round-trip, so it is left alone.
    odd = write(suite, "test_odd.agent.yaml", """\
        agent: stats.yaml
        cases:
          - name: tilde
            input: {items: [1]}
            expect: {verdict: "small: total 2", stats: {largest: ~}}
        """)
    broken = write(suite, "test_broken.agent.yaml", """\
        agent: stats.yaml
        cases:
          - name: agent_fails
            input: {items: "x"}
            expect: {verdict: "anything"}
        """)
    before = {path: path.read_text(encoding="utf-8") for path in (odd, broken)}
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-rf",
                                        "--isobranch-update")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines_random([
        "FAILED test_odd.agent.yaml::tilde - final state differs*",
        "FAILED test_broken.agent.yaml::agent_fails - the agent failed*",
        "  not updated: test_odd.agent.yaml is left alone: ruamel.yaml would not write it "
        "back unchanged (line 5: *largest: ~}}' would become *largest: null}}'); edit it by hand",
        "left alone: test_odd.agent.yaml: ruamel.yaml would not write it back unchanged*",
        "*PytestWarning: isobranch: tilde not updated: test_odd.agent.yaml is left alone*",
        "*2 failed, 1 passed, 1 warning, 3 updated*",
    ])
    assert {path: path.read_text(encoding="utf-8") for path in (odd, broken)} == before


def test_without_ruamel_yaml_the_option_is_a_usage_error_naming_the_install(
        suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A 'ruamel' package without 'yaml' on the path hides the installed one.
    hidden = tmp_path / "no_ruamel"
    (hidden / "ruamel").mkdir(parents=True)
    (hidden / "ruamel" / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(hidden), os.environ.get("PYTHONPATH")])))
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--isobranch-update")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert ("--isobranch-update rewrites case files with ruamel.yaml, which is not installed: "
            "pip install 'isobranch[regression]' (or pip install ruamel.yaml)"
            in result.stderr.str())
    # Without the option, the suite runs as ever.
    plain = suite.runpytest_subprocess("-p", "no:cacheprovider", "-k", "fine")
    assert plain.ret == 0
