"""Case files: finding them, reading them, and validating every key with its line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .text import short

CASE_FILE_PATTERN = re.compile(r"^test_.+\.agent\.ya?ml$")
FILE_KEYS = ("agent", "description", "isolation", "branch_timeout", "fail_fast", "cases")
CASE_KEYS = ("name", "description", "input", "expect", "expect_error", "skip", "xfail")
CASE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# The item name of a case file that cannot be read at all; no valid case name
# starts with '<', so it never collides with a case.
FILE_ITEM_NAME = "<file>"
# What ``expect:`` holds in a case whose final state is to be recorded
# (``pytest --isobranch-update`` fills it in).
RECORD_EXPECT = "record"
# How much of an unusable 'cases' value its message quotes.
MAX_QUOTED_CASES_CHARS = 60


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
    # ``expect: record``: nothing to compare yet; --isobranch-update records the final state.
    record: bool = False


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
        got = "nothing" if raw_cases is None else repr(raw_cases)[:MAX_QUOTED_CASES_CHARS]
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
                            f"{type(state).__name__} {short(state)}")
            state = {}
        has_expect, has_error = "expect" in spec, "expect_error" in spec
        expect, expect_error = spec.get("expect"), spec.get("expect_error")
        if has_expect and has_error:
            problems.append("give either 'expect' or 'expect_error', not both")
        elif not has_expect and not has_error:
            problems.append("missing 'expect' (a subset of the final state) or 'expect_error' "
                            "(a substring of the error message)")
        record = has_expect and expect == RECORD_EXPECT
        if has_expect and not record and not isinstance(expect, Mapping):
            problems.append(f"'expect' must be a mapping (a subset of the final state) or "
                            f"{RECORD_EXPECT!r}, got {type(expect).__name__} {short(expect)}")
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
                          skip=skip, xfail=xfail, problems=tuple(problems), record=record))
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

