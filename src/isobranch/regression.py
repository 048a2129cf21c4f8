"""Agent regression files: schema, running a case, subset matching, readable reports.

This module holds the pure parts of the pytest plugin (``isobranch.pytest_plugin``)
and never imports pytest, so other runners can reuse it.

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

from __future__ import annotations

import json
import os
import re
import reprlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import GraphError, GraphExecutionError

CASE_FILE_PATTERN = re.compile(r"^test_.+\.agent\.ya?ml$")
FILE_KEYS = ("agent", "description", "isolation", "branch_timeout", "fail_fast", "cases")
CASE_KEYS = ("name", "description", "input", "expect", "expect_error", "skip", "xfail")
CASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# The item name of a case file that cannot be read at all; no valid case name
# starts with '<', so it never collides with a case.
FILE_ITEM_NAME = "<file>"
MAX_DIFF_LINES = 20


def is_case_file(name: str) -> bool:
    """True for file names the plugin collects: ``test_*.agent.yaml`` / ``.agent.yml``."""
    return bool(CASE_FILE_PATTERN.match(name))


@dataclass(frozen=True)
class Case:
    """One case of a case file; ``problems`` non-empty means the case is invalid."""

    index: int
    name: str                       # the item name: the case's name, or cases[i] if unusable
    line: int | None                # 1-based line in the case file
    input: dict = field(default_factory=dict)
    expect: dict | None = None
    expect_error: str | None = None
    description: str | None = None
    skip: str | None = None
    xfail: str | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaseFile:
    """A parsed case file.

    ``fatal`` is set when the file cannot be used at all (unreadable, bad
    YAML, no usable ``cases`` list); ``problems`` are file-level mistakes
    that make every case fail.
    """

    path: Path
    agent: str | None = None
    description: str | None = None
    isolation: str | None = None
    branch_timeout: float | None = None
    fail_fast: bool | None = None
    cases: tuple[Case, ...] = ()
    problems: tuple[str, ...] = ()
    fatal: str | None = None

    def agent_path(self) -> Path | None:
        """The agent YAML's path: ``agent`` resolved against the case file's directory."""
        if not self.agent:
            return None
        return Path(os.path.normpath(self.path.parent / Path(self.agent).expanduser()))

    def engine_options(self) -> dict[str, Any]:
        """The ``YAMLEngine`` options this file sets (only the keys it gives)."""
        options: dict[str, Any] = {}
        if self.isolation is not None:
            options["isolation"] = self.isolation
        if self.branch_timeout is not None:
            options["branch_timeout"] = self.branch_timeout
        if self.fail_fast is not None:
            options["fail_fast"] = self.fail_fast
        return options


def load_case_file(path: str | Path, *, backends: Sequence[str] | None = None) -> CaseFile:
    """Read and validate a case file. Never raises for a bad file: see ``CaseFile``.

    ``backends``, when given, are the isolation names a file may choose.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return CaseFile(path, fatal=f"cannot read the case file: {exc}")
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        # Before constructing: construction flattens merge keys ('<<') into the
        # nodes, which would make an overridden merged key look duplicated.
        file_duplicates, case_duplicates = _duplicates(root)
        document = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return CaseFile(path, fatal=f"invalid YAML: {where}{getattr(exc, 'problem', None) or exc}")
    finally:
        loader.dispose()
    if not isinstance(document, Mapping):
        return CaseFile(path, fatal="the case file must be a mapping with 'agent' and 'cases', "
                                    f"got {type(document).__name__}")
    key_nodes = _mapping_nodes(root)
    problems = [f"line {line}: duplicate key {key!r}" for key, line in file_duplicates]
    for key in sorted(set(document) - set(FILE_KEYS), key=str):
        problems.append(f"unknown key {key!r} (allowed: {', '.join(FILE_KEYS)})")
    agent = document.get("agent")
    if not isinstance(agent, str) or not agent.strip():
        problems.append("'agent' is required: the path of the agent YAML, relative to this file")
        agent = None
    description = document.get("description")
    isolation = document.get("isolation")
    if isolation is not None and (not isinstance(isolation, str) or (
            backends is not None and isolation not in backends)):
        available = f"; available: {', '.join(backends)}" if backends is not None else ""
        problems.append(f"isolation: unknown isolation backend {isolation!r}{available}")
        isolation = None
    branch_timeout = document.get("branch_timeout")
    if branch_timeout is not None and not is_positive_number(branch_timeout):
        problems.append(f"branch_timeout: must be a positive number of seconds, got {branch_timeout!r}")
        branch_timeout = None
    fail_fast = document.get("fail_fast")
    if fail_fast is not None and not isinstance(fail_fast, bool):
        problems.append(f"fail_fast: must be true or false, got {fail_fast!r}")
        fail_fast = None
    raw_cases = document.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        got = "nothing" if raw_cases is None else repr(raw_cases)[:60]
        return CaseFile(path, fatal="'cases' must be a non-empty list of cases "
                                    f"(each with name, input and expect or expect_error), got {got}")
    case_nodes = key_nodes.get("cases")
    case_lines = ([item.start_mark.line + 1 for item in case_nodes.value]
                  if isinstance(case_nodes, yaml.SequenceNode) else [])
    cases = _cases(raw_cases, case_lines, case_duplicates)
    return CaseFile(path, agent=agent, description=description if isinstance(description, str) else None,
                    isolation=isolation, branch_timeout=branch_timeout, fail_fast=fail_fast,
                    cases=tuple(cases), problems=tuple(problems))


def is_positive_number(value: Any) -> bool:
    """A positive int or float (booleans are not numbers here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def _mapping_nodes(node: yaml.Node) -> dict[Any, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: value for key, value in node.value if isinstance(key, yaml.ScalarNode)}


def _duplicates(root: yaml.Node | None) -> tuple[list[tuple[str, int]], list[list[tuple[str, int]]]]:
    """Repeated keys outside ``cases``, and per case, as ``(key, line)`` pairs."""
    if not isinstance(root, yaml.MappingNode):
        return [], []
    cases = _mapping_nodes(root).get("cases")
    in_cases = ([_duplicate_keys(item) for item in cases.value]
                if isinstance(cases, yaml.SequenceNode) else [])
    outside = _duplicate_keys(root, skip=cases)
    return outside, in_cases


def _duplicate_keys(node: yaml.Node, skip: yaml.Node | None = None) -> list[tuple[str, int]]:
    """(key, line) of every repeated scalar key in the mappings under ``node``.

    YAML silently keeps the last of two equal keys; in a case file that hides
    a mistake (two ``expect:`` blocks, say), so it is reported instead.
    """
    found: list[tuple[str, int]] = []
    stack = [node]
    seen_nodes: set[int] = {id(skip)} if skip is not None else set()
    while stack:
        current = stack.pop()
        if id(current) in seen_nodes:  # aliases can make the node graph cyclic
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        found.append((key.value, key.start_mark.line + 1))
                    keys.add(key.value)
                stack.append(value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return sorted(found, key=lambda item: item[1])


def _cases(raw_cases: list, lines: list[int], duplicates: list[list[tuple[str, int]]]) -> list[Case]:
    names_seen: dict[str, int] = {}
    duplicated: set[str] = set()
    for spec in raw_cases:
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if isinstance(name, str) and CASE_NAME.match(name):
            if name in names_seen:
                duplicated.add(name)
            names_seen.setdefault(name, len(names_seen))
    cases: list[Case] = []
    used: set[str] = set()
    for index, spec in enumerate(raw_cases):
        line = lines[index] if index < len(lines) else None
        fallback = f"cases[{index}]"
        if not isinstance(spec, Mapping):
            cases.append(Case(index, fallback, line, problems=(
                f"{fallback} must be a mapping with name, input and expect or expect_error, "
                f"got {type(spec).__name__}",)))
            continue
        problems: list[str] = []
        if index < len(duplicates):
            problems.extend(f"line {line}: duplicate key {key!r}" for key, line in duplicates[index])
        name = spec.get("name")
        item_name = fallback
        if name is None or name == "":
            problems.append(f"{fallback}: missing 'name'")
        elif not isinstance(name, str):
            problems.append(f"{fallback}: 'name' must be a string, got {type(name).__name__} "
                            f"{name!r} (quote it)")
        elif not CASE_NAME.match(name):
            problems.append(f"{fallback}: invalid name {name!r}: use letters, digits, '_', '-' "
                            "and '.', starting with a letter, digit or '_'")
        elif name in used:
            problems.append(f"duplicate case name {name!r}: case names must be unique in a file")
        else:
            item_name = name
            used.add(name)
            if name in duplicated:
                problems.append(f"duplicate case name {name!r}: case names must be unique in a file")
        for key in sorted(set(spec) - set(CASE_KEYS), key=str):
            problems.append(f"unknown key {key!r} (allowed: {', '.join(CASE_KEYS)})")
        state = spec.get("input", {})
        if state is None:
            state = {}
        if not isinstance(state, Mapping):
            problems.append(f"'input' must be a mapping (the initial state), got "
                            f"{type(state).__name__} {_short(state)}")
            state = {}
        has_expect, has_error = "expect" in spec, "expect_error" in spec
        expect, expect_error = spec.get("expect"), spec.get("expect_error")
        if has_expect and has_error:
            problems.append("give either 'expect' or 'expect_error', not both")
        elif not has_expect and not has_error:
            problems.append("missing 'expect' (a subset of the final state) or 'expect_error' "
                            "(a substring of the error message)")
        if has_expect and not isinstance(expect, Mapping):
            problems.append(f"'expect' must be a mapping (a subset of the final state), got "
                            f"{type(expect).__name__} {_short(expect)}")
            expect = None
        if has_error and (not isinstance(expect_error, str) or not expect_error):
            problems.append(f"'expect_error' must be a non-empty string, got {expect_error!r}")
            expect_error = None
        skip = _reason(spec, "skip", problems)
        xfail = _reason(spec, "xfail", problems)
        description = spec.get("description")
        cases.append(Case(index, item_name, line, input=dict(state),
                          expect=dict(expect) if isinstance(expect, Mapping) else None,
                          expect_error=expect_error if isinstance(expect_error, str) else None,
                          description=description if isinstance(description, str) else None,
                          skip=skip, xfail=xfail, problems=tuple(problems)))
    return cases


def _reason(spec: Mapping, key: str, problems: list[str]) -> str | None:
    value = spec.get(key)
    if value is None or value is False:
        return None
    if value is True:
        return f"{key} in the case file"
    if isinstance(value, str) and value:
        return value
    problems.append(f"'{key}' must be a reason (a string) or true, got {value!r}")
    return None


# --- running a case --------------------------------------------------------


@dataclass
class RunRecord:
    """What one run of an agent did: its final state or its error, and its route."""

    final: dict | None = None
    error: GraphExecutionError | GraphError | None = None
    route: list[str] = field(default_factory=list)
    fan_outs: list[tuple[str | None, list[Any]]] = field(default_factory=list)


def run_agent_case(graph: Any, state: Mapping[str, Any]) -> RunRecord:
    """Run a compiled graph on ``state``, recording the route and every fan-out.

    ``stream`` rather than ``invoke``: when a fan-in node later fails, the
    report can still say which branch failed before it.
    """
    record = RunRecord()
    last_node: str | None = None
    try:
        for event in graph.stream(dict(state)):
            kind = event["type"]
            if kind == "node":
                last_node = event["node"]
                record.route.append(last_node)
            elif kind == "parallel":
                branches = list(event["branches"])
                record.fan_outs.append((last_node, branches))
                record.route.append("[" + " | ".join(
                    f"{r.branch}" + ("" if r.success else " (timed out)" if r.timed_out else " (failed)")
                    for r in branches) + "]")
            elif kind == "final":
                record.final = event["state"]
    except (GraphExecutionError, GraphError) as exc:
        record.error = exc
    return record


# --- comparing -------------------------------------------------------------


def subset_differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Readable lines for every place ``actual`` does not match ``expected``.

    Mappings are matched as subsets (recursively); everything else exactly.
    An empty list means the values match.
    """
    return [line for _, line in _differences(expected, actual, path)]


def _differences(expected: Any, actual: Any, path: str = "") -> list[tuple[str, str]]:
    """``(short label, line)`` per difference, capped at ``MAX_DIFF_LINES``."""
    found: list[tuple[str, str]] = []
    _diff(expected, actual, path, subset=True, out=found)
    if len(found) > MAX_DIFF_LINES:
        more = len(found) - MAX_DIFF_LINES
        found = [*found[:MAX_DIFF_LINES], ("...", f"... and {more} more difference{'s' * (more != 1)}")]
    return found


def values_equal(expected: Any, actual: Any) -> bool:
    """Exact equality, except that numbers compare by value and bools are not numbers."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return expected.keys() == actual.keys() and all(
            values_equal(value, actual[key]) for key, value in expected.items())
    if _is_list(expected) and _is_list(actual):
        return len(expected) == len(actual) and all(
            values_equal(a, b) for a, b in zip(expected, actual, strict=True))
    if _is_list(expected) or _is_list(actual) or isinstance(expected, Mapping) or isinstance(
            actual, Mapping):
        return False
    try:
        return bool(expected == actual)
    except Exception:  # an odd object's __eq__ must not crash the report
        return False


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _diff(expected: Any, actual: Any, path: str, *, subset: bool,
          out: list[tuple[str, str]]) -> None:
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            where = path or "final state"
            out.append((where, f"{where}: expected a mapping {_short(expected)}, "
                               f"got {_kind(actual)} {_short(actual)}"))
            return
        for key, value in expected.items():
            child = _join(path, key)
            if key not in actual:
                out.append((f"{child} missing", f"missing key: {child} (expected {_short(value)})"))
            else:
                _diff(value, actual[key], child, subset=subset, out=out)
        if not subset:
            for key in actual:
                if key not in expected:
                    child = _join(path, key)
                    out.append((f"{child} unexpected",
                                f"unexpected key: {child} = {_short(actual[key])}"))
        return
    if _is_list(expected) and _is_list(actual):
        if len(expected) != len(actual):
            line = (f"{path}: expected {len(expected)} item{'s' * (len(expected) != 1)}, "
                    f"got {len(actual)}")
            at = next((i for i, (want, got) in enumerate(zip(expected, actual, strict=False))
                       if not values_equal(want, got)), min(len(expected), len(actual)))
            line += (f"; first difference at index {at}: expected "
                     f"{_short(list(expected[at:at + 3]))}, got {_short(list(actual[at:at + 3]))}")
            out.append((path, line))
            return
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            # Inside a list nothing is a subset: a list states the whole value.
            _diff(want, got, f"{path}[{index}]", subset=False, out=out)
        return
    if not values_equal(expected, actual):
        out.append((path, _mismatch(path, expected, actual)))


def _mismatch(path: str, expected: Any, actual: Any) -> str:
    line = f"{path}: expected {_short(expected)}, got {_short(actual)}"
    if type(expected) is not type(actual) and not (_is_number(expected) and _is_number(actual)):
        line += f" ({_kind(actual)}, not {_kind(expected)})"
    elif isinstance(expected, str) and isinstance(actual, str) and max(len(expected), len(actual)) > 40:
        at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                  min(len(expected), len(actual)))
        line += (f"\n    first difference at character {at}: expected {expected[at:at + 30]!r}, "
                 f"got {actual[at:at + 30]!r}")
    return line


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    return {list: "a list", tuple: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float", type(None): "null"}.get(type(value), type(value).__name__)


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _join(path: str, key: Any) -> str:
    if isinstance(key, str) and _KEY.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = 8
_REPR.maxdict = 8
_REPR.maxlevel = 4


def _short(value: Any) -> str:
    """A one-line, length-capped repr for reports."""
    try:
        return _REPR.repr(value)
    except Exception:  # an odd object's __repr__ must not crash the report
        return f"<{type(value).__name__}>"


# --- reports ----------------------------------------------------------------


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


class CaseFailure(Exception):
    """A case failed; ``str()`` is the complete, readable report."""


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
        return _report(context, "the agent could not run", [_bounded(str(error))], record)
    if error is not None:
        if isinstance(error, GraphExecutionError):
            return _report(context, _error_headline(error), _error_lines(error, record), record)
        return _report(context, "the agent could not run", [_bounded(str(error))], record)
    differences = _differences(case.expect or {}, record.final or {})
    if not differences:
        return None
    labels = ", ".join(label for label, _ in differences)
    if len(labels) > 100:
        labels = labels[:97] + "..."
    head = f"final state differs from expect ({labels})"
    return _report(context, head, [line for _, line in differences], record)


def _error_headline(error: GraphExecutionError) -> str:
    kind = error.error_type or type(error).__name__
    if getattr(error, "timed_out", False):
        kind += ", timed out"
    if not error.node:
        return f"the agent failed: {kind}"
    where = f"node {error.node!r}" + (f", branch {error.branch!r}" if error.branch else " (main path)")
    return f"the agent failed in {where}: {kind}"


def _error_lines(error: GraphExecutionError, record: RunRecord) -> list[str]:
    lines = ["error: " + _indent_rest(_bounded(str(error)), "  ")]
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
        for source, result in failed[:MAX_STATE_LINES]:
            origin = f" (fan-out from {source!r})" if source else ""
            message = str(result.error)
            # Errors usually name their type already; say it only when they do not.
            kind = "" if str(result.error_type) in message else f"{result.error_type}: "
            lines.append(f"  {result.branch}{origin}: {kind}"
                         + _indent_rest(_bounded(message), "    "))
        if len(failed) > MAX_STATE_LINES:
            lines.append(f"  ... and {len(failed) - MAX_STATE_LINES} more failed branches")
    lines += _traceback_lines(error, [r for _, r in failed])
    return lines


_ENGINE_DIR = str(Path(__file__).resolve().parent)


def _user_frames(text: str) -> list[str]:
    """A traceback's lines without its header and the engine's own frames: the agent's code."""
    lines = text.rstrip().splitlines()
    kept: list[str] = []
    skipping = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("Traceback (most recent call last)"):
            continue
        if stripped.startswith('File "'):
            skipping = _ENGINE_DIR in stripped
            if skipping:
                continue
        elif skipping and line.startswith("    "):
            continue  # the source lines and carets of a skipped frame
        else:
            skipping = False
        kept.append(line)
    return kept


MAX_TRACEBACKS = 3
MAX_TRACEBACK_LINES = 15
MAX_TRACEBACK_LINE_CHARS = 200


def _traceback_lines(error: GraphExecutionError, failed: list[Any]) -> list[str]:
    """The failing code's traceback (from whichever process ran it), then failed branches'."""
    shown: list[tuple[str, str]] = []
    own = getattr(error, "traceback", None)
    if own:
        shown.append((f"traceback ({error.branch or 'main path'})", own))
    for result in failed:
        if len(shown) >= MAX_TRACEBACKS:
            break
        if result.traceback and result.traceback != own:
            shown.append((f"traceback of branch {result.branch!r}", result.traceback))
    lines = []
    for title, text in shown:
        body = _user_frames(text)
        if len(body) > MAX_TRACEBACK_LINES:
            body = ["  ...", *body[-MAX_TRACEBACK_LINES:]]
        lines.append(f"{title}:")
        lines += [f"  {_bounded(line, MAX_TRACEBACK_LINE_CHARS)}" for line in body]
    return lines


MAX_STATE_LINES = 20
MAX_MESSAGE_CHARS = 600


def _state_lines(state: Mapping[str, Any]) -> list[str]:
    if not state:
        return ["  {}"]
    lines = [f"  {_join('', key)}: {_short(value)}"
             for key, value in list(state.items())[:MAX_STATE_LINES]]
    if len(state) > MAX_STATE_LINES:
        lines.append(f"  ... and {len(state) - MAX_STATE_LINES} more keys")
    return lines


def _bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text``, or its start and end around a note of what was left out."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} ... [{len(text) - 2 * keep} characters left out] ... {text[-keep:]}"


def _indent_rest(text: str, indent: str) -> str:
    return text.replace("\n", "\n" + indent)


def _report(context: CaseContext, head: str, body: list[str], record: RunRecord | None, *,
            run_details: bool = True) -> str:
    where = context.case_file + (f":{context.line}" if context.line else "")
    lines = [head]
    lines += ["  " + _indent_rest(line, "  ") for line in body]
    lines.append(f"  case: {context.case_name} in {where}")
    if run_details and context.agent:
        lines.append(f"  agent: {context.agent} (isolation: {context.isolation or 'from the agent YAML'})")
        lines.append(f"  input: {_short(dict(context.input))}")
    if record is not None and record.route:
        lines.append(f"  route: {' -> '.join(record.route)}")
    if run_details and context.agent:
        command, missing = reproduce_command(context)
        if missing:
            lines.append(f"  rerun (approximate: {'; '.join(missing)}): {command}")
        else:
            lines.append(f"  rerun: {command}")
    return "\n".join(lines)


MAX_INLINE_INPUT = 400


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
