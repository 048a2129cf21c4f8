"""Reports of failed cases: what went wrong first, then the details, the case and how to rerun it."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GraphError, GraphExecutionError
from .case_file import Case
from .compare import differences
from .running import RunRecord
from .text import bounded, indent_rest, join_key, short
from .tracebacks import traceback_lines

# Keys of a final state listed in a report, and failed branches listed.
MAX_STATE_LINES = 20
MAX_FAILED_BRANCHES = 20
# Characters kept of an error message (its start and its end).
MAX_MESSAGE_CHARS = 600
# Characters of the headline's list of differing keys.
MAX_LABELS_CHARS = 100
# Longest JSON input the rerun command spells out; a longer one goes in a file.
MAX_INLINE_INPUT = 400


@dataclass(frozen=True)
class CaseContext:
    """Where a case comes from, for the footer of every report."""

    case_name: str
    case_file: str                  # as shown to the user (rootdir-relative)
    line: int | None
    agent: str | None               # as usable from the current directory
    isolation: str | None
    input: Mapping[str, Any]
    # Engine options in effect that ``isobranch run`` cannot set.
    cli_gaps: tuple[str, ...] = ()


def check_case(case: Case, record: RunRecord, context: CaseContext) -> str | None:
    """The report of a failed case, or None when ``record`` satisfies ``case``."""
    error = record.error
    if case.expect_error is not None:
        if error is None:
            return _report(context, f"expected an error containing {case.expect_error!r}, "
                                    "but the agent succeeded",
                           ["final state:", *_state_lines(record.final or {})], record)
        if isinstance(error, GraphExecutionError) and case.expect_error in str(error):
            return None
        if isinstance(error, GraphExecutionError):
            head = f"the error does not contain {case.expect_error!r}"
            body = [f"expected substring: {case.expect_error!r}", *_error_lines(error, record)]
            return _report(context, head, body, record)
        return _report(context, "the agent could not run", [_message(str(error))], record)
    if error is not None:
        if isinstance(error, GraphExecutionError):
            return _report(context, _error_headline(error), _error_lines(error, record), record)
        return _report(context, "the agent could not run", [_message(str(error))], record)
    if case.record:
        return _report(context, "expect: record holds no expectation yet; run pytest "
                                "--isobranch-update to record this final state",
                       ["final state:", *_state_lines(record.final or {})], record)
    found = differences(case.expect or {}, record.final or {})
    if not found:
        return None
    labels = ", ".join(label for label, _ in found)
    if len(labels) > MAX_LABELS_CHARS:
        labels = labels[:MAX_LABELS_CHARS - 3] + "..."
    head = f"final state differs from expect ({labels})"
    return _report(context, head, [line for _, line in found], record)


def _error_headline(error: GraphExecutionError) -> str:
    kind = error.error_type or type(error).__name__
    if getattr(error, "timed_out", False):
        kind += ", timed out"
    if not error.node:
        return f"the agent failed: {kind}"
    where = f"node {error.node!r}" + (f", branch {error.branch!r}" if error.branch else " (main path)")
    return f"the agent failed in {where}: {kind}"


def _error_lines(error: GraphExecutionError, record: RunRecord) -> list[str]:
    lines = ["error: " + indent_rest(_message(str(error)), "  ")]
    # A failure outside any node (a closed graph, say) has no node to name.
    if error.node is not None:
        lines += [f"node: {error.node}", f"branch: {error.branch or '(main path)'}"]
    if error.error_type is not None:
        lines.append(f"error_type: {error.error_type}")
    if getattr(error, "timed_out", False):
        lines.append("timed out: yes")
    failed = [(source, r) for source, results in record.fan_outs for r in results if not r.success]
    failed += [(None, r) for r in (error.results or []) if not r.success]
    # A branch whose error the message above already quotes would only repeat it.
    failed = [(source, r) for source, r in failed if str(r.error) not in str(error)]
    if failed:
        lines.append("failed branches:")
        for source, result in failed[:MAX_FAILED_BRANCHES]:
            origin = f" (fan-out from {source!r})" if source else ""
            message = str(result.error)
            # Errors usually name their type already; say it only when they do not.
            kind = "" if str(result.error_type) in message else f"{result.error_type}: "
            lines.append(f"  {result.branch}{origin}: {kind}"
                         + indent_rest(_message(message), "    "))
        if len(failed) > MAX_FAILED_BRANCHES:
            lines.append(f"  ... and {len(failed) - MAX_FAILED_BRANCHES} more failed branches")
    lines += traceback_lines(error, [r for _, r in failed])
    return lines


def _message(text: str) -> str:
    return bounded(text, MAX_MESSAGE_CHARS)


def _state_lines(state: Mapping[str, Any]) -> list[str]:
    if not state:
        return ["  {}"]
    lines = [f"  {join_key('', key)}: {short(value)}"
             for key, value in list(state.items())[:MAX_STATE_LINES]]
    if len(state) > MAX_STATE_LINES:
        lines.append(f"  ... and {len(state) - MAX_STATE_LINES} more keys")
    return lines


def _report(context: CaseContext, head: str, body: list[str], record: RunRecord | None, *,
            run_details: bool = True) -> str:
    where = context.case_file + (f":{context.line}" if context.line else "")
    lines = [head]
    lines += ["  " + indent_rest(line, "  ") for line in body]
    lines.append(f"  case: {context.case_name} in {where}")
    if run_details and context.agent:
        lines.append(f"  agent: {context.agent} (isolation: {context.isolation or 'from the agent YAML'})")
        lines.append(f"  input: {short(dict(context.input))}")
    if record is not None and record.route:
        lines.append(f"  route: {' -> '.join(record.route)}")
    if run_details and context.agent:
        command, missing = reproduce_command(context)
        if missing:
            lines.append(f"  rerun (approximate: {'; '.join(missing)}): {command}")
        else:
            lines.append(f"  rerun: {command}")
    return "\n".join(lines)


def reproduce_command(context: CaseContext) -> tuple[str, list[str]]:
    """An ``isobranch run`` command line for the case's agent and input, and what it misses.

    The command is exact only when the input survives JSON unchanged, is
    short enough to read, and no option the command line cannot express
    applies (``branch_timeout``, ``fail_fast`` from the case file or the
    pytest options); otherwise the second item names what differs.
    """
    missing: list[str] = []
    state: str | None
    try:
        state = json.dumps(dict(context.input), separators=(", ", ": "))
        if json.loads(state) != dict(context.input):
            missing.append("the input does not survive JSON unchanged")
    except (TypeError, ValueError):
        state = None
        missing.append("the input is not JSON; it is left out")
    if state is not None and len(state) > MAX_INLINE_INPUT:
        state = "@input.json"
        missing.append("save the case's input as input.json")
    command = ["isobranch", "run", context.agent or "?"]
    if state is not None:
        command += ["--input", state]
    if context.isolation:
        command += ["--isolation", context.isolation]
    missing += [f"{option} is not set by this command" for option in context.cli_gaps]
    return shlex.join(command), missing


def invalid_case_report(context: CaseContext, file_problems: Sequence[str],
                        case_problems: Sequence[str] = ()) -> str:
    """The report of a case (or case file) that is itself invalid."""
    problems = [*file_problems, *case_problems]
    head = "invalid case file" if file_problems else "invalid case"
    if len(problems) == 1:
        return _report(context, f"{head}: {problems[0]}", [], None, run_details=False)
    return _report(context, f"{head}: {len(problems)} problems", [f"- {p}" for p in problems], None,
                   run_details=False)


def agent_error_report(context: CaseContext, error: GraphError) -> str:
    """The report of a case whose agent YAML cannot be loaded: the ``GraphError`` message."""
    problems = error.problems or [str(error)]
    if len(problems) == 1:
        return _report(context, f"the agent cannot be loaded: {error}", [], None, run_details=False)
    head = f"the agent cannot be loaded: {error.source or context.agent}: {len(problems)} problems"
    return _report(context, head, [f"- {problem}" for problem in problems], None, run_details=False)
