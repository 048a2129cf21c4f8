"""The suite's own leak checks: a process left running is blamed on the module that left it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import descendants, processes_left_behind

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent


def _stays_until_stdin_closes() -> subprocess.Popen:
    # Ends by itself once its parent closes the pipe or exits, so a check that misses
    # it still leaves nothing behind.
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)


def test_a_process_started_after_the_baseline_and_left_running_is_named_with_its_command():
    before = descendants()
    child = _stays_until_stdin_closes()
    try:
        left = processes_left_behind(before)
        assert list(left) == [child.pid]
        assert "sys.stdin.read()" in left[child.pid]
    finally:
        child.stdin.close()
        child.wait(30)
    assert processes_left_behind(before) == {}, "an ended process is not left behind"


def test_a_process_alive_before_the_baseline_is_not_this_checks_to_blame():
    child = _stays_until_stdin_closes()
    try:
        assert processes_left_behind(descendants()) == {}
    finally:
        child.stdin.close()
        child.wait(30)


def test_the_module_that_leaves_a_process_fails_and_the_next_module_does_not(
        pytester, plain_os_environ):
    # The suite's conftest, loaded under another name by the inner session's own.
    pytester.makeconftest(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "suite_conftest", {str(ROOT / "tests" / "conftest.py")!r})
        suite = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(suite)
        no_process_outlives_its_module = suite.no_process_outlives_its_module
        """)
    pytester.makepyfile(test_a_leaky=textwrap.dedent("""
        import subprocess, sys

        KEPT = []

        def test_starts_a_process_and_never_ends_it():
            # Ends once this session exits and closes its stdin.
            KEPT.append(subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                         stdin=subprocess.PIPE))
        """), test_b_clean=textwrap.dedent("""
        def test_runs_while_the_other_modules_process_is_still_alive():
            pass
        """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "0",
                                           "-o", f"pythonpath={ROOT}")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_starts_a_process_and_never_ends_it*",
        "*test_a_leaky.py left processes running after its last test: *sys.stdin.read()*"])
    assert "ERROR at teardown of test_runs_while" not in result.stdout.str()
