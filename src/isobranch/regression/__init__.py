"""Agent regression files: schema, running a case, subset matching, readable reports.

This package holds the pure parts of the pytest plugin (``isobranch.pytest_plugin``)
and never imports pytest, so other runners can reuse it. Its modules:
``case_file`` (finding, reading and validating case files), ``running``
(running one case), ``compare`` (subset matching), ``report`` (the report
of a failed case) with ``tracebacks`` and ``text``; every public name is
imported here.

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
    Case,
    CaseFile,
    is_case_file,
    is_positive_number,
    load_case_file,
)
from .compare import MAX_DIFF_LINES, subset_differences, values_equal
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
from .tracebacks import MAX_TRACEBACK_LINE_CHARS, MAX_TRACEBACK_LINES, MAX_TRACEBACKS

__all__ = [
    "CASE_FILE_PATTERN", "CASE_KEYS", "CASE_NAME", "FILE_ITEM_NAME", "FILE_KEYS",
    "MAX_DIFF_LINES", "MAX_INLINE_INPUT", "MAX_MESSAGE_CHARS", "MAX_STATE_LINES",
    "MAX_TRACEBACKS", "MAX_TRACEBACK_LINES", "MAX_TRACEBACK_LINE_CHARS",
    "Case", "CaseContext", "CaseFailure", "CaseFile", "RunRecord",
    "agent_error_report", "check_case", "invalid_case_report", "is_case_file",
    "is_positive_number", "load_case_file", "reproduce_command", "run_agent_case",
    "subset_differences", "values_equal",
]
