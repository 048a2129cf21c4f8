"""Agent regression files: schema, running a case, subset matching, readable reports.

This package holds the pure parts of the pytest plugin (``isobranch.pytest_plugin``)
and never imports pytest, so other runners can reuse it. Its modules:
``case_file`` (finding, reading and validating case files), ``running``
(running one case), ``compare`` (subset matching), ``report`` (the report
of a failed case) with ``tracebacks`` and ``text``; ``cassettes`` (the
recordings of ``replay: true`` nodes per case file); ``coverage`` (which
nodes and edges the cases ran), ``updates`` and ``case_rewrite``
(``--isobranch-update``: what to change, and rewriting a file through
ruamel.yaml), ``files`` (atomic writes) and ``session`` (what one pytest
process gathers, as plain data for xdist); every public name is imported
here.

A *case file* is named ``test_*.agent.yaml`` (or ``.agent.yml``)::

    agent: triage.yaml          # the agent workflow, relative to this file (required)
    description: free text      # optional
    isolation: process          # optional default for this file; --isobranch-isolation wins
    branch_timeout: 10          # optional, seconds; --isobranch-branch-timeout wins
    fail_fast: true             # optional
    cases:                      # required, a non-empty list
      - name: small_total       # required; letters, digits, '_', '-', '.'; unique in the file
        description: free text  # optional
        input: {items: [1, 2]}  # optional mapping, the initial state (default {})
        expect:                 # a subset of the final state ...
          verdict: "small: total 3 < 10"
      - name: to_record
        expect: record          # ... or 'record': --isobranch-update fills in the final state
      - name: bad_input
        input: {items: "x"}
        expect_error: python_stats   # ... or a substring of the error message
        skip: "reason"          # optional (or xfail: "reason")

Matching rules for ``expect``: a mapping matches when every key it names
is present in the final state and its value matches; nested mappings are
matched the same way (extra keys in the final state are fine). Lists must
match exactly — same length, same items in the same order, and mappings
inside lists with exactly the same keys. Numbers compare by value (``3``
matches ``3.0``), but a boolean never matches a number. ``expect: {}``
only asserts that the run succeeds.

``expect_error`` passes when the run raises ``GraphExecutionError`` whose
message contains the substring (case-sensitive).
"""

from ..errors import CaseFailure
from .case_file import (
    CASE_FILE_PATTERN,
    CASE_KEYS,
    CASE_NAME,
    FILE_ITEM_NAME,
    FILE_KEYS,
    RECORD_EXPECT,
    Case,
    CaseFile,
    is_case_file,
    is_positive_number,
    load_case_file,
)
from .case_rewrite import (
    INSTALL_HINT,
    CaseRewriteError,
    file_digest,
    rewrite_case_file,
    round_trip_problem,
    ruamel_available,
)
from .cassettes import RECORD_FLAG, CassetteShelf, CassetteWriteResult, RecordingLedger, cassette_path
from .compare import MAX_DIFF_LINES, Difference, all_differences, subset_differences, values_equal
from .coverage import (
    ANY_NODE,
    COVERAGE_SCHEMA_VERSION,
    CoverageLedger,
    Exercised,
    GraphShape,
    ShapeEdge,
    coverage_lines,
    coverage_report,
    exercised,
    graph_shape,
)
from .files import write_atomically
from .report import (
    MAX_INLINE_INPUT,
    MAX_MESSAGE_CHARS,
    MAX_STATE_LINES,
    CaseContext,
    agent_error_report,
    check_case,
    invalid_case_report,
    reproduce_command,
)
from .running import RunRecord, run_agent_case
from .session import FileUpdateResult, SessionRecords
from .tracebacks import MAX_TRACEBACK_LINE_CHARS, MAX_TRACEBACK_LINES, MAX_TRACEBACKS
from .updates import (
    CaseUpdate,
    ExpectChange,
    UnrecordableValue,
    UpdateKind,
    UpdateLedger,
    case_value,
    plan_update,
)

__all__ = [
    "ANY_NODE", "CASE_FILE_PATTERN", "CASE_KEYS", "CASE_NAME", "COVERAGE_SCHEMA_VERSION",
    "FILE_ITEM_NAME", "FILE_KEYS", "INSTALL_HINT",
    "MAX_DIFF_LINES", "MAX_INLINE_INPUT", "MAX_MESSAGE_CHARS", "MAX_STATE_LINES",
    "MAX_TRACEBACKS", "MAX_TRACEBACK_LINES", "MAX_TRACEBACK_LINE_CHARS", "RECORD_EXPECT",
    "RECORD_FLAG",
    "Case", "CaseContext", "CaseFailure", "CaseFile", "CaseRewriteError", "CaseUpdate",
    "CassetteShelf", "CassetteWriteResult",
    "CoverageLedger", "Difference", "Exercised", "ExpectChange", "FileUpdateResult",
    "GraphShape", "RecordingLedger", "RunRecord", "SessionRecords", "ShapeEdge", "UnrecordableValue",
    "UpdateKind", "UpdateLedger",
    "agent_error_report", "all_differences", "case_value", "cassette_path", "check_case", "coverage_lines",
    "coverage_report", "exercised", "file_digest", "graph_shape", "invalid_case_report",
    "is_case_file", "is_positive_number", "load_case_file", "plan_update", "reproduce_command",
    "rewrite_case_file", "round_trip_problem", "ruamel_available", "run_agent_case",
    "subset_differences", "values_equal", "write_atomically",
]
