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
from .yaml_engine import YAMLEngine

__all__ = ["AgentCaseFile", "AgentCaseItem", "AgentGraphs", "AgentRunner", "agent_graphs",
           "cli_options", "display_path", "isobranch_engine", "run_agent"]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--isobranch-isolation`` and ``--isobranch-branch-timeout``."""
    group = parser.getgroup("isobranch", "isobranch agent regression runs")
    group.addoption("--isobranch-isolation", metavar="NAME", default=None,
                    help="run every agent on this isolation backend (overrides case files "
                         "and agent YAML settings), e.g. inline, thread, process, dask")
    group.addoption("--isobranch-branch-timeout", metavar="SECONDS", type=_positive_seconds,
                    default=None, help="branch timeout for every agent, in seconds")


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


def pytest_configure(config: pytest.Config) -> None:
    """Validate ``--isobranch-isolation`` and create this process's graph registry."""
    isolation = config.getoption("isobranch_isolation", None)
    # Checked here rather than while parsing arguments so backends that a
    # conftest registers are accepted.
    if isolation is not None and isolation not in available_backends():
        raise pytest.UsageError(f"--isobranch-isolation: unknown isolation backend {isolation!r}; "
                                f"available: {', '.join(available_backends())}")
    config.stash[_GRAPHS] = AgentGraphs()


def pytest_report_header(config: pytest.Config) -> str | None:
    """One header line, only when an isobranch option is given."""
    options = cli_options(config)
    if not options:
        return None
    return "isobranch: " + ", ".join(f"{key}={value}" for key, value in options.items())


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Close every compiled agent (and its worker pools) of this process."""
    _close_graphs(session.config)


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
        try:
            graph = agent_graphs(self.config).get(agent, options)
        except GraphError as exc:
            raise CaseFailure(agent_error_report(context, exc)) from None
        context = self._context(graph.isolation)
        report = check_case(case, run_agent_case(graph, case.input, label=self.nodeid), context)
        if report is not None:
            raise CaseFailure(report)

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
