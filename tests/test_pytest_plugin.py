"""The isobranch pytest plugin: agent regression files, options, fixtures, xdist.

Most tests run an inner pytest session in a pytester directory: in-process
where that is enough, in a subprocess when the run uses ``-n 2`` or worker
processes.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from isobranch.regression import (
    is_case_file,
    load_case_file,
    subset_differences,
    values_equal,
)

pytest_plugins = ["pytester"]
# Inner sessions, and the subprocesses runpytest_subprocess starts, see a
# user's plain environment, not this session's (no PYTHONUNBUFFERED, no PYTEST_*).
pytestmark = pytest.mark.usefixtures("plain_os_environ")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "regression"

# A fan-out to a Lua and a Python branch, a fan-in, and a conditional route.
STATS_AGENT = (ROOT / "tests" / "fixtures" / "stats_agent.yaml").read_text(encoding="utf-8")

# Reports where its Python branch ran, as seen from the main path (the caller).
WHERE_AGENT = """
name: where
settings:
  parallel: {isolation: thread}
nodes:
  - name: start
    run: return None
  - name: probe
    run: |
      import os
      return {"pid": os.getpid()}
  - name: lua_probe
    run: |
      -- lua
      return {lua = true}
  - name: join
    fan_in: true
    run: |
      import os
      probe = next(r for r in parallel_results if r.branch == "probe")
      return {"isolation": probe.isolation, "in_worker": probe.state["pid"] != os.getpid()}
edges:
  - {from: __start__, to: start}
  - {from: start, to: probe, type: parallel, fan_in: join}
  - {from: start, to: lua_probe, type: parallel, fan_in: join}
  - {from: probe, to: join}
  - {from: lua_probe, to: join}
"""

# A Lua branch that spins until something stops it (the Lua timeout is long).
SLOW_AGENT = """
name: slow
settings:
  lua: {timeout: 60}
  parallel: {isolation: thread, fail_fast: true}
nodes:
  - name: start
    run: return None
  - name: spin
    run: |
      -- lua
      while true do end
  - name: quick
    run: |
      return {"quick": True}
  - name: join
    fan_in: true
    run: |
      return {"done": True}
edges:
  - {from: __start__, to: start}
  - {from: start, to: spin, type: parallel, fan_in: join}
  - {from: start, to: quick, type: parallel, fan_in: join}
  - {from: spin, to: join}
  - {from: quick, to: join}
"""


def write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """node id -> PASSED/FAILED/ERROR..., from the ``-rA`` short summary."""
    found = {}
    for line in result.outlines:
        match = re.match(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


def assert_no_plugin_traceback(output: str) -> None:
    assert "Traceback" not in output
    assert "pytest_plugin.py" not in output
    assert "regression.py" not in output and "isobranch/regression/" not in output
    assert "raise CaseFailure" not in output


# --- collection -------------------------------------------------------------


def test_each_case_is_an_item_with_a_file_colon_case_id(pytester: pytest.Pytester) -> None:
    write(pytester, "agents/stats.yaml", STATS_AGENT)
    write(pytester, "suite/test_stats.agent.yaml", """
        agent: ../agents/stats.yaml
        cases:
          - {name: small_total, input: {items: [1, 2]}, expect: {}}
          - {name: big-total.v2, input: {items: [10, 20]}, expect: {}}
        """)
    # Neither an agent YAML nor a YAML test file without '.agent' is a case file.
    write(pytester, "suite/test_other.yaml", "agent: x\ncases: []\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert [line for line in result.outlines if "::" in line] == [
        "suite/test_stats.agent.yaml::small_total",
        "suite/test_stats.agent.yaml::big-total.v2",
    ]
    assert result.ret == pytest.ExitCode.OK


def test_case_file_names_that_are_collected() -> None:
    assert is_case_file("test_demo.agent.yaml") and is_case_file("test_demo.agent.yml")
    assert not is_case_file("demo.agent.yaml") and not is_case_file("test_demo.yaml")
    assert not is_case_file("test_demo.agent.yaml.bak") and not is_case_file("stats.yaml")


def test_verbose_ids_keep_dots_in_case_names_under_xdist_reporting(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_v.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: case.with.dots, input: {items: [1]}, expect: {}}
        """)
    result = pytester.runpytest("-v")
    result.stdout.fnmatch_lines(["test_v.agent.yaml::case.with.dots PASSED*"])


# --- expect / expect_error ---------------------------------------------------


def test_expect_mismatch_reports_key_path_expected_and_actual(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_stats.agent.yaml", """
        agent: stats.yaml
        cases:
          - name: small_total
            input: {items: [1, 2]}
            expect: {verdict: "small: total 3", stats: {total: 3, count: 2}}
          - name: regressed
            input: {items: [10, 20, 1, 2]}
            expect:
              verdict: "small: total 3"
              stats: {count: 3, median: 2}
        """)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "final state differs from expect (verdict, stats.count, stats.median missing)",
        "  verdict: expected 'small: total 3', got 'big: total 33'",
        "  stats.count: expected 3, got 4",
        "  missing key: stats.median (expected 2)",
        "  case: regressed in test_stats.agent.yaml:6",
        "  agent: stats.yaml (isolation: thread)",
        "  input: {'items': [10, 20, 1, 2]}",
        "  route: start -> [[]lua_stats | python_stats[]] -> combine -> big",
    ])
    result.stdout.fnmatch_lines(["FAILED test_stats.agent.yaml::regressed - final state differs*"])
    assert_no_plugin_traceback(result.stdout.str())


def test_expect_error_matches_a_substring_and_reports_mismatches(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_errors.agent.yaml", """
        agent: stats.yaml
        cases:
          - name: matches
            input: {items: "x"}
            expect_error: "items must be a list"
          - name: wrong_substring
            input: {items: "x"}
            expect_error: "no such text"
          - name: succeeded_instead
            input: {items: [1]}
            expect_error: "python_stats"
        """)
    result = pytester.runpytest("-rA")
    assert outcomes(result) == {
        "test_errors.agent.yaml::matches": "PASSED",
        "test_errors.agent.yaml::wrong_substring": "FAILED",
        "test_errors.agent.yaml::succeeded_instead": "FAILED",
    }
    result.stdout.fnmatch_lines([
        "the error does not contain 'no such text'",
        "  expected substring: 'no such text'",
        "  error: *node 'python_stats' in branch 'python_stats' failed: ValueError: items must be a list*",
    ])
    result.stdout.fnmatch_lines([
        "expected an error containing 'python_stats', but the agent succeeded",
        "  final state:",
        "    items: [1]",
        "    stats: {'count': 1, 'largest': 1, 'total': 1}",
        "    verdict: 'small: total 1'",
    ])
    assert_no_plugin_traceback(result.stdout.str())


def test_failing_node_in_a_branch_is_named_with_its_branch(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_fail.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: crash, input: {items: "x"}, expect: {verdict: "small: total 0"}}
        """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "the agent failed in node 'python_stats', branch 'python_stats': ValueError",
        "  error: fan-out from node 'start': branch 'python_stats' failed (fail_fast): *",
        "  node: python_stats",
        "  branch: python_stats",
        "  error_type: ValueError",
    ])
    assert_no_plugin_traceback(result.stdout.str())


def test_failure_report_shows_the_branch_traceback_without_engine_frames(
        pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_fail.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: crash, input: {items: "x"}, expect: {verdict: "small: total 0"}}
        """)
    result = pytester.runpytest("--isobranch-isolation", "process")
    result.assert_outcomes(failed=1)
    # The frame is the agent file's line, its text shown though a worker process ran it.
    line = STATS_AGENT.splitlines().index(
        '          raise ValueError(f"items must be a list, got {items!r}")') + 1
    result.stdout.fnmatch_lines([
        "  traceback (python_stats):",
        f'      File "stats.yaml", line {line}, in __isobranch_node__',
        '        raise ValueError(f"items must be a list, got {items!r}")',
        "    ValueError: items must be a list, got 'x'",
    ])
    assert "runner.py" not in result.stdout.str(), "the engine's own frames are left out"
    assert_no_plugin_traceback(result.stdout.str())


def test_branch_failure_before_a_failing_fan_in_is_listed(pytester: pytest.Pytester) -> None:
    # Without fail_fast the fan-in runs and fails on the missing branch state;
    # the report still names the branch that failed first.
    write(pytester, "stats.yaml", STATS_AGENT.replace("fail_fast: true", "fail_fast: false"))
    write(pytester, "test_fail.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: crash, input: {items: "x"}, expect: {}}
        """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "the agent failed in node 'combine' (main path): KeyError",
        "  node: combine",
        "  branch: (main path)",
        "  failed branches:",
        "    python_stats (fan-out from 'start'): node 'python_stats' in branch 'python_stats' "
        "failed: ValueError: *items must be a list*",
        "  route: start -> [[]lua_stats | python_stats (failed)[]]",
    ])


def test_broken_agent_yaml_fails_only_its_own_items(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "broken.yaml", "name: broken\nnodes:\n  - name: a\n    run: [unclosed\n")
    write(pytester, "test_broken.agent.yaml", """
        agent: broken.yaml
        cases:
          - {name: one, expect: {}}
          - {name: two, expect_error: "anything"}
        """)
    write(pytester, "test_good.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: fine, input: {items: [1]}, expect: {verdict: "small: total 1"}}
        """)
    result = pytester.runpytest("-rA")
    assert outcomes(result) == {
        "test_broken.agent.yaml::one": "FAILED",
        "test_broken.agent.yaml::two": "FAILED",
        "test_good.agent.yaml::fine": "PASSED",
    }
    result.stdout.fnmatch_lines(["the agent cannot be loaded: broken.yaml:5:1: invalid YAML: *"] * 2)
    assert "error" not in result.parseoutcomes()
    assert_no_plugin_traceback(result.stdout.str())


def test_malformed_case_files_fail_only_the_affected_items(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_cases.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: good, input: {items: [1]}, expect: {}}
          - {name: both, input: {}, expect: {}, expect_error: "x"}
          - {name: neither, input: {}}
          - {name: not_a_mapping, input: [1, 2], expect: {}}
          - {name: typo, inptu: {}, expect: {}}
          - {name: twice, expect: {}}
          - {name: twice, expect: {}}
          - {input: {}, expect: {}}
          - {name: "has space", expect: {}}
        """)
    write(pytester, "test_unreadable.agent.yaml", "agent: stats.yaml\ncases: [\n")
    write(pytester, "test_no_cases.agent.yaml", "agent: stats.yaml\ncases: []\n")
    write(pytester, "test_file_level.agent.yaml", """
        agent: stats.yaml
        isolaton: process
        branch_timeout: -1
        cases:
          - {name: a, expect: {}}
        """)
    result = pytester.runpytest("-rA")
    assert outcomes(result) == {
        "test_cases.agent.yaml::good": "PASSED",
        "test_cases.agent.yaml::both": "FAILED",
        "test_cases.agent.yaml::neither": "FAILED",
        "test_cases.agent.yaml::not_a_mapping": "FAILED",
        "test_cases.agent.yaml::typo": "FAILED",
        "test_cases.agent.yaml::twice": "FAILED",
        "test_cases.agent.yaml::cases[6]": "FAILED",
        "test_cases.agent.yaml::cases[7]": "FAILED",
        "test_cases.agent.yaml::cases[8]": "FAILED",
        "test_unreadable.agent.yaml::<file>": "FAILED",
        "test_no_cases.agent.yaml::<file>": "FAILED",
        "test_file_level.agent.yaml::a": "FAILED",
    }
    out = result.stdout.str()
    for expected in [
        "invalid case: give either 'expect' or 'expect_error', not both",
        "  case: both in test_cases.agent.yaml:4",
        "invalid case: missing 'expect' (a subset of the final state) or 'expect_error'",
        "invalid case: 'input' must be a mapping (the initial state), got list [1, 2]",
        "invalid case: unknown key 'inptu' (allowed: name, description, input, expect,",
        "invalid case: duplicate case name 'twice': case names must be unique in a file",
        "  case: cases[6] in test_cases.agent.yaml:9",
        "invalid case: cases[7]: missing 'name'",
        "invalid case: cases[8]: invalid name 'has space'",
        "invalid case file: invalid YAML: line 3, column 1:",
        "invalid case file: 'cases' must be a non-empty list",
        "invalid case file: 2 problems",
        "  - unknown key 'isolaton' (allowed: agent, description, isolation,",
        "  - branch_timeout: must be a positive number of seconds, got -1",
    ]:
        assert expected in out, expected
    assert "error" not in result.parseoutcomes()
    assert_no_plugin_traceback(out)


def test_skip_and_xfail_cases(pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "test_marks.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: skipped, skip: "not today", expect: {}}
          - {name: known_bug, xfail: "issue 7", input: {items: [1]}, expect: {verdict: "wrong"}}
        """)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(skipped=1, xfailed=1)


# --- options ------------------------------------------------------------------


def test_isolation_option_runs_branches_in_worker_processes(pytester: pytest.Pytester) -> None:
    # The agent asks for threads; the option must win over it and over the case file.
    write(pytester, "where.yaml", WHERE_AGENT)
    write(pytester, "test_where.agent.yaml", """
        agent: where.yaml
        isolation: inline
        cases:
          - {name: in_a_worker_process, expect: {isolation: process, in_worker: true}}
        """)
    write(pytester, "test_where_fixture.py", """
        import os

        def test_run_agent_honours_the_option(run_agent):
            final = run_agent("where.yaml")
            assert final == {"isolation": "process", "in_worker": True}
            assert run_agent("where.yaml", isolation="inline")["isolation"] == "inline"
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isobranch-isolation",
                                           "process", "-rA")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["isobranch: isolation=process"])
    without = pytester.runpytest("-rA", "test_where.agent.yaml")
    without.assert_outcomes(failed=1)
    without.stdout.fnmatch_lines(["  isolation: expected 'process', got 'inline'"])


def test_flat_backend_options_go_to_the_backend_the_option_chooses(
        pytester: pytest.Pytester) -> None:
    # The agent chooses no backend (thread), but its flat option is process's.
    write(pytester, "fresh.yaml", """
        name: fresh
        settings:
          parallel: {max_workers: 1, fresh_worker_per_branch: true}
        nodes:
          - name: start
            run: return None
          - name: probe
            run: |
              import os
              return {"pid": os.getpid()}
          - name: join
            fan_in: true
            run: |
              return {"pid": parallel_results[0].state["pid"]}
        edges:
          - {from: __start__, to: start}
          - {from: start, to: probe, type: parallel, fan_in: join}
          - {from: probe, to: join}
        """)
    write(pytester, "test_fresh.py", """
        def test_every_branch_gets_a_new_worker(run_agent):
            # One worker at most, yet two runs see two: the option was applied.
            assert run_agent("fresh.yaml")["pid"] != run_agent("fresh.yaml")["pid"]
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isobranch-isolation",
                                           "process", "-rA")
    result.assert_outcomes(passed=1)
    without = pytester.runpytest("-rA")
    without.assert_outcomes(failed=1)
    without.stdout.fnmatch_lines(["*settings.parallel.fresh_worker_per_branch: not an option of "
                                  "isolation backend 'thread' but of 'process'*"])


def test_unknown_isolation_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--isobranch-isolation", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--isobranch-isolation: unknown isolation backend 'nope'; "
                                 "available: *inline*process*thread*"])


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_branch_timeout_must_be_a_positive_number(pytester: pytest.Pytester, value: str) -> None:
    result = pytester.runpytest(f"--isobranch-branch-timeout={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--isobranch-branch-timeout: must be a positive number of seconds*"])


def test_branch_timeout_option_times_out_a_slow_branch(pytester: pytest.Pytester) -> None:
    write(pytester, "slow.yaml", SLOW_AGENT)
    write(pytester, "test_slow.agent.yaml", """
        agent: slow.yaml
        cases:
          - {name: spins, expect: {done: true}}
        """)
    result = pytester.runpytest("--isobranch-branch-timeout", "0.3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "the agent failed in node 'spin', branch 'spin': BranchTimeout, timed out",
        "  error: *branch 'spin' timed out after 0.3s in node 'spin'*",
        "  timed out: yes",
    ])


# --- fixtures -------------------------------------------------------------------


def test_run_agent_and_engine_fixtures_in_a_hand_written_test(pytester: pytest.Pytester) -> None:
    write(pytester, "agents/stats.yaml", STATS_AGENT)
    write(pytester, "tests/test_hand.py", """
        import pytest
        from isobranch import GraphExecutionError, YAMLEngine

        def test_final_state(run_agent):
            final = run_agent("../agents/stats.yaml", {"items": [4, 8]})
            assert final["verdict"] == "big: total 12"

        def test_overrides_and_shared_graph(run_agent):
            graph = run_agent.graph("../agents/stats.yaml", isolation="inline")
            assert graph is run_agent.graph("../agents/stats.yaml", isolation="inline")
            assert graph.isolation == "inline"
            final = run_agent("../agents/stats.yaml", {"items": [1]}, isolation="inline")
            assert final["stats"]["total"] == 1

        def test_failure_raises(run_agent):
            with pytest.raises(GraphExecutionError) as failure:
                run_agent("../agents/stats.yaml", {"items": "x"})
            assert (failure.value.node, failure.value.branch) == ("python_stats", "python_stats")

        def test_engine(isobranch_engine, request):
            assert isinstance(isobranch_engine, YAMLEngine)
            path = request.path.parent.parent / "agents" / "stats.yaml"
            with isobranch_engine.load_from_file(path) as graph:
                assert graph.isolation == "inline"      # from --isobranch-isolation
                assert graph.invoke({"items": [2]})["stats"]["total"] == 2
        """)
    result = pytester.runpytest("--isobranch-isolation", "inline")
    result.assert_outcomes(passed=4)


def test_plugin_is_inert_without_case_files(pytester: pytest.Pytester) -> None:
    write(pytester, "test_plain.py", """
        from isobranch.pytest_plugin import agent_graphs

        def test_nothing_compiled(pytestconfig):
            assert len(agent_graphs(pytestconfig)) == 0
        """)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "isobranch:" not in result.stdout.str()  # no header line without options


# --- sessions, xdist, ordering ---------------------------------------------------


def write_mixed_suite(pytester: pytest.Pytester) -> None:
    """Passing, failing, erroring, invalid and process-isolated cases in several files."""
    write(pytester, "agents/stats.yaml", STATS_AGENT)
    write(pytester, "agents/where.yaml", WHERE_AGENT)
    write(pytester, "agents/broken.yaml", "nodes: [{name: a}]\n")
    write(pytester, "suite/test_stats.agent.yaml", """
        agent: ../agents/stats.yaml
        cases:
          - {name: small, input: {items: [1, 2]}, expect: {verdict: "small: total 3"}}
          - {name: big, input: {items: [10, 2]}, expect: {verdict: "big: total 12"}}
          - {name: wrong, input: {items: [10, 2]}, expect: {verdict: "small: total 12"}}
          - {name: error_expected, input: {items: "x"}, expect_error: "python_stats"}
          - {name: error_unexpected, input: {items: "x"}, expect: {}}
          - {name: invalid, input: 3, expect: {}}
        """)
    write(pytester, "suite/test_where.agent.yaml", """
        agent: ../agents/where.yaml
        isolation: process
        cases:
          - {name: first, expect: {isolation: process, in_worker: true}}
          - {name: second, expect: {isolation: process, in_worker: true}}
        """)
    write(pytester, "suite/test_broken.agent.yaml", """
        agent: ../agents/broken.yaml
        cases:
          - {name: a, expect: {}}
        """)
    write(pytester, "suite/test_unreadable.agent.yaml", "cases: {\n")
    write(pytester, "reverse_order.py", """
        def pytest_collection_modifyitems(items):
            items.reverse()
        """)


MIXED_OUTCOMES = {
    "suite/test_stats.agent.yaml::small": "PASSED",
    "suite/test_stats.agent.yaml::big": "PASSED",
    "suite/test_stats.agent.yaml::wrong": "FAILED",
    "suite/test_stats.agent.yaml::error_expected": "PASSED",
    "suite/test_stats.agent.yaml::error_unexpected": "FAILED",
    "suite/test_stats.agent.yaml::invalid": "FAILED",
    "suite/test_where.agent.yaml::first": "PASSED",
    "suite/test_where.agent.yaml::second": "PASSED",
    "suite/test_broken.agent.yaml::a": "FAILED",
    "suite/test_unreadable.agent.yaml::<file>": "FAILED",
}


def test_same_outcomes_with_n0_n2_n_auto_and_reversed_order(pytester: pytest.Pytester) -> None:
    write_mixed_suite(pytester)
    common = ("-p", "no:cacheprovider", "-p", "no:randomly", "-rA", "suite")
    serial = pytester.runpytest_subprocess("-n", "0", *common)
    parallel = pytester.runpytest_subprocess("-n", "2", *common)
    automatic = pytester.runpytest_subprocess("-n", "auto", *common)
    reversed_parallel = pytester.runpytest_subprocess("-n", "2", "-p", "reverse_order", *common)
    assert outcomes(serial) == MIXED_OUTCOMES
    assert outcomes(parallel) == MIXED_OUTCOMES
    assert outcomes(automatic) == MIXED_OUTCOMES
    assert outcomes(reversed_parallel) == MIXED_OUTCOMES
    assert "created: 2/2 workers" in parallel.stdout.str()
    for result in (serial, parallel, automatic, reversed_parallel):
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        assert "error" not in result.parseoutcomes()


def test_graphs_and_worker_processes_are_gone_after_the_session(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the inner conftest reads /proc with benchmarks'
    write(pytester, "where.yaml", WHERE_AGENT)
    write(pytester, "test_where.agent.yaml", """
        agent: where.yaml
        cases:
          - {name: one, expect: {isolation: process}}
          - {name: two, expect: {isolation: process}}
        """)
    # Records the processes below pytest after each test and once the plugin has
    # closed everything (a trylast sessionfinish runs after the plugin's).
    write(pytester, "conftest.py", """
        import json
        import pytest
        from benchmarks.proc_scan import descendants
        from isobranch.pytest_plugin import agent_graphs

        SEEN = []

        def pytest_runtest_logfinish(nodeid):
            SEEN.append(len(descendants()))

        @pytest.hookimpl(trylast=True)
        def pytest_sessionfinish(session):
            record = {"during": SEEN, "graphs": len(agent_graphs(session.config)),
                      "after": sorted(descendants())}
            with open("processes.json", "w") as out:
                json.dump(record, out)
        """)
    result = pytester.runpytest_subprocess("-n", "0", "-p", "no:cacheprovider",
                                           "--isobranch-isolation", "process")
    result.assert_outcomes(passed=2)
    record = json.loads((pytester.path / "processes.json").read_text())
    assert min(record["during"]) > 0, "the process backend should have had workers during the run"
    assert record["graphs"] == 0
    assert record["after"] == []


def test_examples_regression_suite_passes_under_xdist(pytester: pytest.Pytester) -> None:
    root = EXAMPLES.parents[1]
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-rA",
                                           f"--rootdir={root}", str(EXAMPLES))
    found = outcomes(result)
    cases = [node for node in found if ".agent.yaml::" in node]
    assert len(cases) >= 5
    assert set(found.values()) == {"PASSED"}, result.stdout.str()
    assert result.ret == pytest.ExitCode.OK


# --- the pure parts (isobranch.regression) -------------------------------------


def test_subset_matching_rules() -> None:
    final = {"a": 1, "nested": {"x": 1, "y": [1, {"k": 2}]}, "flag": True, "f": 3.0}
    assert subset_differences({}, final) == []
    assert subset_differences({"nested": {"x": 1}}, final) == []          # nested: subset
    assert subset_differences({"f": 3, "a": 1.0}, final) == []             # numbers by value
    assert subset_differences({"flag": 1}, final) == [
        "flag: expected 1, got True (a boolean, not an integer)"]
    assert subset_differences({"nested": {"y": [1]}}, final) == [
        "nested.y: expected 1 item, got 2; first difference at index 1: expected [], got [{'k': 2}]"]
    # Inside lists nothing is a subset: mappings there must match exactly.
    assert subset_differences({"nested": {"y": [1, {}]}}, final) == ["unexpected key: nested.y[1].k = 2"]
    assert subset_differences({"b": None}, final) == ["missing key: b (expected None)"]
    assert subset_differences({"nested": 1}, final) == [
        "nested: expected 1, got {'x': 1, 'y': [1, {'k': 2}]} (a mapping, not an integer)"]
    assert subset_differences({"a": {"z": 1}}, final) == [
        "a: expected a mapping {'z': 1}, got an integer 1"]
    assert values_equal([1, 2.0], [1.0, 2]) and not values_equal([True], [1])


def test_long_strings_point_at_the_first_difference() -> None:
    expected = "the quick brown fox jumps over the lazy dog " * 2
    actual = expected[:50] + "CAT" + expected[53:]
    (line,) = subset_differences({"s": expected}, {"s": actual})
    assert line.endswith("first difference at character 50: expected 'ick brown fox jumps over the l', "
                         "got 'CAT brown fox jumps over the l'")


def test_load_case_file_reports_duplicate_yaml_keys(tmp_path: Path) -> None:
    path = tmp_path / "test_dup.agent.yaml"
    path.write_text("agent: a.yaml\ncases:\n  - name: one\n    expect: {}\n    expect: {a: 1}\n")
    case_file = load_case_file(path)
    (case,) = case_file.cases
    assert case.problems == ("line 5: duplicate key 'expect'",)
    assert case.line == 3
    assert case_file.problems == ()          # only the case with the duplicate fails


def test_yaml_merge_keys_may_be_overridden_in_a_case(tmp_path: Path) -> None:
    path = tmp_path / "test_merge.agent.yaml"
    path.write_text(textwrap.dedent("""
        agent: a.yaml
        cases:
          - &base {name: one, input: {items: [1]}, expect: {ok: true}}
          - {<<: *base, name: two, input: {items: [2]}}
        """))
    case_file = load_case_file(path)
    assert case_file.problems == ()
    assert [(c.name, c.input, c.expect, c.problems) for c in case_file.cases] == [
        ("one", {"items": [1]}, {"ok": True}, ()), ("two", {"items": [2]}, {"ok": True}, ())]


# --- the shared graphs and bounded reports ---------------------------------------


def test_a_graph_that_fails_to_close_is_reported_and_the_others_still_close(
        pytester: pytest.Pytester) -> None:
    write(pytester, "stats.yaml", STATS_AGENT)
    write(pytester, "conftest.py", """
        from isobranch import register_backend
        from isobranch.isolation.thread import ThreadBackend

        class BadClose(ThreadBackend):
            name = "badclose"
            def close(self):
                super().close()
                raise RuntimeError("cluster shutdown timed out")

        register_backend("badclose", BadClose, replace=True)
        """)
    write(pytester, "test_bad.agent.yaml", """
        agent: stats.yaml
        isolation: badclose
        cases:
          - {name: one, input: {items: [1]}, expect: {}}
        """)
    write(pytester, "test_good.agent.yaml", """
        agent: stats.yaml
        cases:
          - {name: two, input: {items: [2]}, expect: {}}
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "default")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.OK
    assert "closing a compiled agent failed: stats (badclose): RuntimeError: cluster shutdown " \
           "timed out" in result.stdout.str() + result.stderr.str()


def test_shared_graphs_key_live_objects_by_identity_and_recompile_when_needed(
        tmp_path: Path, test_backend) -> None:
    from isobranch.isolation.registry import backend_factory
    from isobranch.pytest_plugin import AgentGraphs

    thread_backend = backend_factory("thread")

    class Holder(thread_backend):
        def __init__(self, max_workers=None, *, thing=None):
            super().__init__(max_workers)

    class Alike:
        def __repr__(self) -> str:
            return "<the same repr>"

    test_backend("test-holder", Holder)
    agent = tmp_path / "stats.yaml"
    agent.write_text(STATS_AGENT)
    graphs = AgentGraphs()
    try:
        first, second = Alike(), Alike()
        one = graphs.get(agent, {"isolation": "test-holder", "thing": first})
        assert graphs.get(agent, {"isolation": "test-holder", "thing": first}) is one
        assert graphs.get(agent, {"isolation": "test-holder", "thing": second}) is not one
        # Somebody closed the shared graph: the next case gets a fresh one.
        one.close()
        again = graphs.get(agent, {"isolation": "test-holder", "thing": first})
        assert again is not one and not again.closed
        # The agent file changed: it is compiled again.
        plain = graphs.get(agent)
        agent.write_text(STATS_AGENT.replace("threshold: 10", "threshold: 100"))
        changed = graphs.get(agent)
        assert changed is not plain and changed.variables["threshold"] == 100
    finally:
        assert graphs.close() == []


def test_failure_reports_stay_short_for_huge_states_and_messages(
        pytester: pytest.Pytester) -> None:
    write(pytester, "huge.yaml", """
        nodes:
          - name: start
            run: |
              if state.get("explode"):
                  raise ValueError("x" * 50000)
              return {f"key{i}": i for i in range(3000)}
        """)
    write(pytester, "test_huge.agent.yaml", """
        agent: huge.yaml
        cases:
          - {name: succeeded, expect_error: "never"}
          - {name: exploded, input: {explode: true}, expect: {}}
        """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    text = result.stdout.str()
    assert "... and 2980 more keys" in text
    assert "characters left out" in text
    assert max(len(line) for line in result.outlines) < 1000
    assert len(result.outlines) < 120


def test_the_rerun_line_says_when_it_is_only_approximate() -> None:
    import datetime

    from isobranch.regression import CaseContext, reproduce_command

    exact = CaseContext(case_name="c", case_file="f", line=1, agent="a.yaml", isolation="thread",
                        input={"items": [1, 2]})
    command, missing = reproduce_command(exact)
    assert command == "isobranch run a.yaml --input '{\"items\": [1, 2]}' --isolation thread"
    assert missing == []
    approximate = CaseContext(case_name="c", case_file="f", line=1, agent="a.yaml",
                              isolation=None, input={"day": datetime.date(2024, 1, 1)},
                              cli_gaps=("fail_fast",))
    command, missing = reproduce_command(approximate)
    assert "--input" not in command
    assert missing == ["the input is not JSON; it is left out",
                       "fail_fast is not set by this command"]
