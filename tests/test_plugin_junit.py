"""Each case's JUnit properties (``agent``, ``isolation``, ``route``, ``duration_ms``), under -n 2.

The XML of a real ``--junitxml`` run of an inner pytest session is parsed.
"""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.usefixtures("plain_os_environ")

ROOT = Path(__file__).resolve().parents[1]
STATS_AGENT = (ROOT / "tests" / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8")


def write(pytester: pytest.Pytester, name: str, text: str) -> None:
    path = pytester.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_every_case_records_agent_isolation_route_and_duration_under_xdist(
        pytester: pytest.Pytester) -> None:
    write(pytester, "agents/stats.yaml", STATS_AGENT)
    write(pytester, "suite/test_thread.agent.yaml", """\
        agent: ../agents/stats.yaml
        cases:
          - name: small
            input: {items: [1, 2]}
            expect: {verdict: "small: total 3"}
          - name: wrong
            input: {items: [10, 20]}
            expect: {verdict: "small: total 30"}
        """)
    write(pytester, "suite/test_process.agent.yaml", """\
        agent: ../agents/stats.yaml
        isolation: process
        cases:
          - name: fails_in_a_branch
            input: {items: "x"}
            expect_error: "items must be a list"
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           "--junitxml=report.xml")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # `wrong` fails; it still has properties
    cases = {}
    for testcase in ET.parse(pytester.path / "report.xml").getroot().iter("testcase"):
        cases[testcase.get("name")] = {prop.get("name"): prop.get("value")
                                       for prop in testcase.iter("property")}
    assert set(cases) == {"small", "wrong", "fails_in_a_branch"}
    for properties in cases.values():
        assert set(properties) == {"agent", "isolation", "route", "duration_ms"}
        assert properties["agent"] == "agents/stats.yaml"
        assert float(properties["duration_ms"]) > 0
    assert cases["small"]["isolation"] == "thread"
    assert cases["small"]["route"] == "start -> [lua_stats | python_stats] -> combine -> small"
    assert cases["wrong"]["route"] == "start -> [lua_stats | python_stats] -> combine -> big"
    assert cases["fails_in_a_branch"]["isolation"] == "process"
    assert cases["fails_in_a_branch"]["route"] == "start"
