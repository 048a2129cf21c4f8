"""pytest plugin: regression runs of isobranch agents, also under pytest-xdist.

Registered through the ``pytest11`` entry point, so installing isobranch is
enough. It does three things:

**Collects case files.** Every ``test_*.agent.yaml`` (or ``.agent.yml``)
in the collected paths is a case file naming an agent YAML and a list of
cases; each case becomes one test item, ``path/test_x.agent.yaml::case``::

    agent: triage.yaml          # relative to this file
    isolation: process          # optional; --isobranch-isolation wins
    branch_timeout: 10          # optional; --isobranch-branch-timeout wins
    fail_fast: false            # optional
    cases:
      - name: small_total
        input: {items: [1, 2]}
        expect: {verdict: "small: total 3 < 10"}     # a subset of the final state
      - name: bad_input
        input: {items: "x"}
        expect_error: python_stats                   # a substring of the error

See ``isobranch.regression`` for the full schema and the matching rules.
Other YAML files (the agents themselves) are never collected. A mistake in
a case, a case file or an agent YAML fails only the items it affects, with
a message naming the file and case; a case file that cannot be read at all
becomes one failing item named ``<file>``.

**Options.** ``--isobranch-isolation NAME`` runs every agent on that
backend (it must be one of ``isobranch.available_backends()``);
``--isobranch-branch-timeout SECONDS`` sets every agent's branch timeout.
``--isobranch-update`` rewrites the differing ``expect`` values of failing
cases (and fills ``expect: record``), reporting those cases as updated;
``--isobranch-record`` runs the agents' ``replay: true`` nodes live and
writes what they returned into ``test_x.agent.cassette.json`` beside each
case file; without it those nodes return their recording and never run.
``--isobranch-coverage`` (and ``--isobranch-coverage-fail-under=PCT``,
``--isobranch-coverage-json=PATH``) reports which nodes and edges of each
agent the cases ran. Under xdist each worker sends what it gathered to the
controller (``workeroutput``), which writes and reports once. Each case
records ``agent``, ``isolation``, ``route`` and ``duration_ms`` as JUnit
properties.

**Fixtures.** ``isobranch_engine`` (session): a ``YAMLEngine`` built from
those options; graphs you load from it are yours to close.
``run_agent(path, input=None, **overrides)``: runs the agent YAML at
``path`` (relative to the requesting test file's directory, or absolute)
and returns its final state; ``overrides`` (``isolation``,
``branch_timeout``, ``fail_fast``, ``max_workers``, ``lua_timeout``, any
``settings.parallel`` key) win over the command-line options, which win
over the agent YAML. ``run_agent.graph(path, **overrides)`` gives the
shared ``CompiledGraph`` itself (do not close it).

Each agent is compiled once per pytest process (one per xdist worker) and
set of options, and its compiled graph — with its worker pools — serves
every case; all of them are closed when the session ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from .compiled import CompiledGraph
from .errors import CaseFailure, GraphError
from .isolation.registry import available_backends
from .regression import (
    FILE_ITEM_NAME,
    Case,
    CaseContext,
    CaseFile,
    agent_error_report,
    check_case,
    invalid_case_report,
    is_case_file,
    load_case_file,
    run_agent_case,
)
from .regression.case_rewrite import INSTALL_HINT, ruamel_available
from .regression.cassettes import RECORD_FLAG, CassetteWriteResult
from .regression.coverage import coverage_lines, coverage_report
from .regression.files import write_atomically
from .regression.running import RunRecord
from .regression.session import FileUpdateResult, SessionRecords
from .yaml_engine import YAMLEngine

__all__ = ["AgentCaseFile", "AgentCaseItem", "AgentGraphs", "AgentRunner", "agent_graphs",
           "cli_options", "display_path", "isobranch_engine", "run_agent", "session_records"]

# The key of this plugin's data in an xdist worker's ``workeroutput``.
WORKER_OUTPUT_KEY = "isobranch"
# The test outcome word and letter of a case ``--isobranch-update`` rewrote.
UPDATED = "updated"


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _percentage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--isobranch-*`` options."""
    group = parser.getgroup("isobranch", "isobranch agent regression runs")
    group.addoption("--isobranch-isolation", metavar="NAME", default=None,
                    help="run every agent on this isolation backend (overrides case files "
                         "and agent YAML settings), e.g. inline, thread, process, dask")
    group.addoption("--isobranch-branch-timeout", metavar="SECONDS", type=_positive_seconds,
                    default=None, help="branch timeout for every agent, in seconds")
    group.addoption("--isobranch-update", action="store_true", default=False,
                    help="rewrite the differing expect values of failing cases and fill "
                         "'expect: record' cases with the final state (needs ruamel.yaml)")
    group.addoption(RECORD_FLAG, action="store_true", default=False,
                    help="run the agents' 'replay: true' nodes live and write what they "
                         "returned into test_x.agent.cassette.json beside each case file "
                         "(by default they replay it and never run)")
    group.addoption("--isobranch-coverage", action="store_true", default=False,
                    help="end with a table of each agent's nodes and edges the cases ran")
    group.addoption("--isobranch-coverage-fail-under", metavar="PCT", type=_percentage,
                    default=None, help="fail the session when graph coverage is below PCT "
                                       "(implies --isobranch-coverage)")
    group.addoption("--isobranch-coverage-json", metavar="PATH", default=None,
                    help="write graph coverage as JSON to PATH (implies --isobranch-coverage)")


def cli_options(config: pytest.Config) -> dict[str, Any]:
    """The ``YAMLEngine`` options given on the command line (only those given)."""
    options: dict[str, Any] = {}
    isolation = config.getoption("isobranch_isolation", None)
    timeout = config.getoption("isobranch_branch_timeout", None)
    if isolation is not None:
        options["isolation"] = isolation
    if timeout is not None:
        options["branch_timeout"] = timeout
    return options


_GRAPHS = pytest.StashKey["AgentGraphs"]()
_RECORDS = pytest.StashKey["SessionRecords"]()
_OUTCOME = pytest.StashKey["SessionOutcome"]()


def coverage_requested(config: pytest.Config) -> bool:
    """Whether graph coverage was asked for (by any of its options)."""
    return bool(config.getoption("isobranch_coverage", False)
                or config.getoption("isobranch_coverage_fail_under", None) is not None
                or config.getoption("isobranch_coverage_json", None))


def pytest_configure(config: pytest.Config) -> None:
    """Validate the options and create this process's graph registry and records."""
    isolation = config.getoption("isobranch_isolation", None)
    # Checked here rather than while parsing arguments so backends that a
    # conftest registers are accepted.
    if isolation is not None and isolation not in available_backends():
        raise pytest.UsageError(f"--isobranch-isolation: unknown isolation backend {isolation!r}; "
                                f"available: {', '.join(available_backends())}")
    update = bool(config.getoption("isobranch_update", False))
    if update and not ruamel_available():
        raise pytest.UsageError("--isobranch-update rewrites case files with ruamel.yaml, which "
                                f"is not installed: {INSTALL_HINT}")
    config.stash[_GRAPHS] = AgentGraphs()
    config.stash[_RECORDS] = SessionRecords(coverage=coverage_requested(config), update=update,
                                            record=bool(config.getoption("isobranch_record",
                                                                         False)))


def session_records(config: pytest.Config) -> SessionRecords:
    """What this pytest process gathered: coverage and case updates."""
    return config.stash[_RECORDS]


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_report_header(config: pytest.Config) -> str | None:
    """One header line, only when an isobranch option is given."""
    options = cli_options(config)
    if not options:
        return None
    return "isobranch: " + ", ".join(f"{key}={value}" for key, value in options.items())


class SessionOutcome:
    """What the controller did at the end of the session, for its summary."""

    def __init__(self) -> None:
        self.updates: list[FileUpdateResult] = []
        self.coverage: dict[str, Any] | None = None
        self.coverage_failures: list[str] = []
        self.coverage_json: str | None = None
        self.cassettes: list[CassetteWriteResult] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Close every compiled agent of this process; then hand on or finish its records.

    An xdist worker puts its records in ``workeroutput`` (sent to the
    controller after this hook). The controller — or a run without xdist —
    writes the updated case files once each, and judges coverage.
    """
    config = session.config
    _close_graphs(config)
    records = config.stash.get(_RECORDS, None)
    if records is None:
        return
    if _is_xdist_worker(config):
        config.workeroutput[WORKER_OUTPUT_KEY] = records.to_plain()  # type: ignore[attr-defined]
        return
    outcome = config.stash[_OUTCOME] = SessionOutcome()
    outcome.updates = records.write_updates()
    if any(result.error for result in outcome.updates):
        _fail(session)  # cases reported as updated whose file could not be written
    outcome.cassettes = records.write_recordings()
    if any(result.error for result in outcome.cassettes):
        _fail(session)  # recordings that could not be written
    if records.coverage is not None:
        _finish_coverage(session, records, outcome)


def _fail(session: pytest.Session) -> None:
    # A session that already failed (or was interrupted) keeps its own exit code.
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _finish_coverage(session: pytest.Session, records: SessionRecords,
                     outcome: SessionOutcome) -> None:
    config = session.config
    report = outcome.coverage = coverage_report(records.coverage)
    path = config.getoption("isobranch_coverage_json", None)
    if path:
        target = Path(config.invocation_params.dir, path)
        try:
            write_atomically(target, json.dumps(report, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            outcome.coverage_failures.append(
                f"cannot write --isobranch-coverage-json={path}: {exc}")
            _fail(session)
        else:
            outcome.coverage_json = str(target)
    fail_under = config.getoption("isobranch_coverage_fail_under", None)
    if fail_under is not None and report["percent"] < fail_under:
        outcome.coverage_failures.append(
            f"isobranch graph coverage {report['percent']:.1f}% is below "
            f"--isobranch-coverage-fail-under={fail_under:g}")
        _fail(session)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """Merge what an xdist worker gathered (its ``workeroutput``) into the controller's records."""
    plain = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY)
    if plain:
        session_records(node.config).merge_plain(plain)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The updated case files, and the coverage table, at the end of the session."""
    outcome = config.stash.get(_OUTCOME, None)
    if outcome is None:
        return
    records = session_records(config)
    if records.updates is not None:
        _summarize_updates(terminalreporter, outcome.updates, records.refused)
    if records.recordings is not None:
        _summarize_recordings(terminalreporter, outcome.cassettes)
    if outcome.coverage is not None:
        terminalreporter.write_sep("-", "isobranch graph coverage")
        for line in coverage_lines(outcome.coverage):
            terminalreporter.write_line(line)
        if outcome.coverage_json:
            terminalreporter.write_line(f"coverage JSON written to {outcome.coverage_json}")
        for failure in outcome.coverage_failures:
            terminalreporter.write_line(f"FAIL: {failure}", red=True, bold=True)


def _summarize_updates(terminal: Any, results: list[FileUpdateResult],
                       refused: Mapping[str, str]) -> None:
    terminal.write_sep("-", "isobranch expectation updates")
    if not results and not refused:
        terminal.write_line("no case needed an update")
    for result in results:
        shown = display_path(result.path)
        if result.error:
            terminal.write_line(f"NOT written: {shown}: {result.error}", red=True)
            continue
        terminal.write_line(f"updated {shown}: {len(result.updates)} "
                            f"case{'s' * (len(result.updates) != 1)}")
        for update in result.updates:
            terminal.write_line(f"  {update.name}: {', '.join(update.labels)}")
    for path, reason in sorted(refused.items()):
        terminal.write_line(f"left alone: {display_path(path)}: {reason}", yellow=True)


def _summarize_recordings(terminal: Any, results: list[CassetteWriteResult]) -> None:
    terminal.write_sep("-", "isobranch recordings")
    if not results:
        terminal.write_line("no case ran a 'replay: true' node")
    for result in results:
        shown = display_path(result.path)
        if result.error:
            terminal.write_line(f"NOT written: {shown}: {result.error}", red=True)
        else:
            terminal.write_line(f"recorded {shown}: {len(result.cases)} "
                                f"case{'s' * (len(result.cases) != 1)}")


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config
                             ) -> tuple[str, str, tuple[str, Mapping[str, bool]]] | None:
    """A case ``--isobranch-update`` rewrote passes as ``updated`` (``U``)."""
    if report.when == "call" and report.passed and getattr(report, "isobranch_updated", None):
        return UPDATED, "U", (UPDATED.upper(), {"yellow": True})
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[Any]:
    """Mark the report of a case that was updated (an attribute xdist carries over)."""
    report = yield
    labels = getattr(item, "updated", None)
    if call.when == "call" and labels:
        report.isobranch_updated = labels
    return report


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close anything left open (a session that never finished normally)."""
    _close_graphs(config)


def _close_graphs(config: pytest.Config) -> None:
    graphs = config.stash.get(_GRAPHS, None)
    if graphs is None:
        return
    # Reported, never raised: the run's results are already in.
    for failure in graphs.close():
        warnings.warn(f"isobranch: closing a compiled agent failed: {failure}",
                      pytest.PytestWarning, stacklevel=1)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect ``test_*.agent.yaml`` case files; every other file is left alone."""
    if is_case_file(file_path.name):
        return AgentCaseFile.from_parent(parent, path=file_path)
    return None


class AgentGraphs:
    """The compiled agents of one pytest process, by (agent path, engine options).

    Every xdist worker is its own process with its own registry, so no pool
    is ever shared between workers. A ``GraphError`` is remembered too: a
    broken agent is read once, not once per case.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[CompiledGraph | GraphError, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, path: str | Path, options: Mapping[str, Any] | None = None) -> CompiledGraph:
        """The shared compiled graph for ``path`` under ``options``; raises ``GraphError``.

        A graph somebody closed, or an agent file changed since it was
        compiled, is compiled afresh.
        """
        absolute = os.path.abspath(path)
        options = dict(options or {})
        key = (absolute, _file_version(absolute), _options_key(options))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (isinstance(entry[0], CompiledGraph) and entry[0].closed):
                try:
                    compiled: CompiledGraph | GraphError = YAMLEngine(**options).load_from_file(
                        display_path(absolute))
                except GraphError as exc:
                    compiled = exc
                # The options are kept with the graph: a key may hold their ids.
                entry = self._entries[key] = (compiled, options)
        if isinstance(entry[0], GraphError):
            raise entry[0].with_traceback(None)
        return entry[0]

    def close(self) -> list[str]:
        """Close every compiled graph (ending its worker pools). Safe to call twice.

        A graph whose ``close()`` fails does not stop the others from closing;
        the failures are returned, one line each.
        """
        with self._lock:
            entries = [entry for entry, _ in self._entries.values()]
            self._entries.clear()
        failures = []
        for entry in entries:
            if isinstance(entry, CompiledGraph):
                try:
                    entry.close()
                except Exception as exc:
                    failures.append(f"{entry.name or 'an agent'} ({entry.isolation}): "
                                    f"{type(exc).__name__}: {exc}")
        return failures

    def __len__(self) -> int:
        return len(self._entries)


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _options_key(options: Mapping[str, Any]) -> tuple:
    # Plain values by value; anything else (a dask client, say) by identity,
    # since two live objects may print alike but are not interchangeable.
    def part(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float, bool)):
            return ("value", type(value).__name__, value)
        if isinstance(value, (tuple, list)) and all(
                v is None or isinstance(v, (str, int, float, bool)) for v in value):
            return ("value", type(value).__name__, tuple(value))
        return ("object", id(value))

    return tuple(sorted((str(key), part(value)) for key, value in options.items()))


def agent_graphs(config: pytest.Config) -> AgentGraphs:
    """The registry of compiled agents of this pytest process."""
    return config.stash[_GRAPHS]


def display_path(path: str | Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute.

    Such a path works both in messages and on an ``isobranch run`` command line.
    """
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


class AgentCaseFile(pytest.File):
    """A ``test_*.agent.yaml`` file: one item per case."""

    def collect(self) -> Iterator[AgentCaseItem]:
        try:
            case_file = load_case_file(self.path, backends=available_backends())
        except Exception as exc:  # a bug here must not stop collection of other files
            case_file = CaseFile(self.path, fatal=f"cannot read the case file: "
                                                  f"{type(exc).__name__}: {exc}")
        if case_file.fatal is not None:
            yield AgentCaseItem.from_parent(self, name=FILE_ITEM_NAME, case_file=case_file, case=None)
            return
        for case in case_file.cases:
            yield AgentCaseItem.from_parent(self, name=case.name, case_file=case_file, case=case)


class AgentCaseItem(pytest.Item):
    """One case: run the agent on ``input``, then check ``expect`` or ``expect_error``."""

    def __init__(self, *, case_file: CaseFile, case: Case | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case_file = case_file
        self.case = case
        # What --isobranch-update changed in this case, once it did.
        self.updated: str | None = None
        if case is not None and not case.problems and not case_file.problems:
            if case.skip is not None:
                self.add_marker(pytest.mark.skip(reason=case.skip))
            if case.xfail is not None:
                self.add_marker(pytest.mark.xfail(reason=case.xfail, raises=CaseFailure))

    def _context(self, isolation: str | None) -> CaseContext:
        agent = self.case_file.agent_path()
        # Options that override the agent YAML and that `isobranch run` cannot set.
        gaps = tuple(sorted(key for key in self.engine_options() if key != "isolation"))
        return CaseContext(
            case_name=self.name, case_file=self.parent.nodeid if self.parent else str(self.path),
            line=self.case.line if self.case else None,
            agent=display_path(agent) if agent else None, isolation=isolation,
            input=self.case.input if self.case else {}, cli_gaps=gaps)

    def engine_options(self) -> dict[str, Any]:
        """Options for this case's agent: the case file's, then the command line's on top."""
        return {**self.case_file.engine_options(), **cli_options(self.config)}

    def runtest(self) -> None:
        options = self.engine_options()
        context = self._context(options.get("isolation"))
        case = self.case
        file_problems = ([self.case_file.fatal] if self.case_file.fatal else []) + list(
            self.case_file.problems)
        case_problems = list(case.problems) if case else []
        agent = self.case_file.agent_path()
        if file_problems or case_problems or case is None or agent is None:
            raise CaseFailure(invalid_case_report(context, file_problems, case_problems))
        records = session_records(self.config)
        agent_key = self._rootdir_relative(agent)
        try:
            graph = agent_graphs(self.config).get(agent, options)
        except GraphError as exc:
            records.agent_not_loaded(agent_key, str(exc).splitlines()[0])
            raise CaseFailure(agent_error_report(context, exc)) from None
        context = self._context(graph.isolation)
        try:
            tape = records.tape(self.path, case.name)
        except GraphError as exc:
            raise CaseFailure(f"{self.nodeid}: {exc}") from None
        record = run_agent_case(graph, case.input, label=self.nodeid, replay=tape)
        records.recorded(self.path, case.name, tape)
        self._record_properties(agent_key, graph.isolation, record)
        records.observe(agent_key, graph, record)
        report = check_case(case, record, context)
        if report is None:
            return
        if case.xfail is None:  # an expected failure is never "fixed" by an update
            update = records.update(case, record, self.path)
            if isinstance(update, str):
                warnings.warn(f"isobranch: {self.name} not updated: {update}",
                              pytest.PytestWarning, stacklevel=1)
                report += f"\n  not updated: {update}"
            elif update is not None:
                self.updated = ", ".join(update.labels)
                return
        raise CaseFailure(report)

    def _rootdir_relative(self, path: Path) -> str:
        # The same in every xdist worker and from any current directory.
        relative = os.path.relpath(path, self.config.rootpath)
        return Path(path).as_posix() if relative.startswith("..") else Path(relative).as_posix()

    def _record_properties(self, agent: str, isolation: str, record: RunRecord) -> None:
        # JUnit XML properties (``--junitxml``); xdist carries them to the controller.
        self.user_properties.extend([
            ("agent", agent), ("isolation", isolation), ("route", " -> ".join(record.route)),
            ("duration_ms", f"{record.duration_ms:.1f}")])

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str | Any:
        # The report says everything; a traceback into the plugin would only hide it.
        if isinstance(excinfo.value, CaseFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        line = self.case.line if self.case else None
        # Not the bare name: pytest's verbose line would turn a '.' in a name
        # that ends the node id into '::'. This one never ends the node id.
        return self.path, (line - 1 if line else None), f"{self.name} ({self.path.name})"


class AgentRunner:
    """``run_agent(path, input=None, **overrides) -> final state`` for hand-written tests."""

    def __init__(self, graphs: AgentGraphs, base_dir: Path, defaults: Mapping[str, Any]) -> None:
        self._graphs = graphs
        self._base_dir = base_dir
        self._defaults = dict(defaults)

    def graph(self, path: str | Path, **overrides: Any) -> CompiledGraph:
        """The shared compiled graph of the agent at ``path`` (closed at session end)."""
        return self._graphs.get(self._base_dir / Path(path).expanduser(),
                                {**self._defaults, **overrides})

    def __call__(self, path: str | Path, input: Mapping[str, Any] | None = None,
                 **overrides: Any) -> dict:
        """Run the agent and return its final state; raises ``GraphExecutionError`` on failure."""
        return self.graph(path, **overrides).invoke(dict(input or {}))


@pytest.fixture(scope="session")
def isobranch_engine(pytestconfig: pytest.Config) -> YAMLEngine:
    """A ``YAMLEngine`` with ``--isobranch-isolation`` / ``--isobranch-branch-timeout`` applied."""
    return YAMLEngine(**cli_options(pytestconfig))


@pytest.fixture
def run_agent(request: pytest.FixtureRequest) -> AgentRunner:
    """Run an agent YAML (path relative to this test file) and return its final state."""
    return AgentRunner(agent_graphs(request.config), Path(request.path).parent,
                       cli_options(request.config))
