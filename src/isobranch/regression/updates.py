"""Updating expectations (``--isobranch-update``): what to change in a failing case's ``expect``.

A case whose run succeeded but whose final state differs from ``expect``
gets one ``ExpectChange`` per difference the comparison reports (as deep
as it reports them): the final state's value at that place, or — where the
final state has no such key — the key removed. A case with ``expect:
record`` gets the whole final state. The changes are plain data
(``CaseUpdate.to_plain``), gathered per pytest process in an
``UpdateLedger`` and sent from xdist workers to the controller, which
writes each case file once (``case_rewrite``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UnrecordableValue
from .case_file import Case
from .compare import all_differences
from .running import RunRecord
from .text import join_key


class UpdateKind(enum.Enum):
    """How a case's ``expect`` changes."""

    VALUES = "values"       # the differing values rewritten
    RECORD = "record"       # ``expect: record`` filled with the final state


@dataclass(frozen=True)
class ExpectChange:
    """Set ``expect`` at ``keys`` to ``value``, or remove that key (``delete``)."""

    keys: tuple[Any, ...]
    value: Any = None
    delete: bool = False


@dataclass(frozen=True)
class CaseUpdate:
    """The change to one case of one case file.

    ``digest`` is the case file's content as this process read it
    (``case_rewrite.file_digest``): the file is written only if it still
    holds that. ``labels`` name what changed, for the session's report.
    """

    path: str
    digest: str
    index: int
    name: str
    kind: UpdateKind
    changes: tuple[ExpectChange, ...]
    labels: tuple[str, ...]

    def to_plain(self) -> dict[str, Any]:
        """Plain data for the trip from an xdist worker."""
        return {"path": self.path, "digest": self.digest, "index": self.index, "name": self.name,
                "kind": self.kind.value, "labels": list(self.labels),
                "changes": [[list(c.keys), c.value, c.delete] for c in self.changes]}

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> CaseUpdate:
        """The update ``to_plain`` described."""
        return cls(plain["path"], plain["digest"], plain["index"], plain["name"],
                   UpdateKind(plain["kind"]),
                   tuple(ExpectChange(tuple(keys), value, delete)
                         for keys, value, delete in plain["changes"]),
                   tuple(plain["labels"]))


def plan_update(case: Case, record: RunRecord, *, path: str, digest: str) -> CaseUpdate | None:
    """The update that makes ``case`` pass on ``record``; None when no update can.

    Only a run that succeeded can be recorded: a case whose agent failed,
    or one that expects an error, keeps failing. Raises
    ``UnrecordableValue`` when a value to write cannot be written in YAML.
    """
    if record.error is not None or record.final is None or case.expect_error is not None:
        return None
    final = record.final
    if case.record:
        return CaseUpdate(path, digest, case.index, case.name, UpdateKind.RECORD,
                          (ExpectChange((), case_value(final, "")),), ("recorded",))
    if case.expect is None:
        return None
    changes = []
    labels = []
    for difference in all_differences(case.expect, final):
        found, value = _lookup(final, difference.keys)
        where = _key_path(difference.keys)
        changes.append(ExpectChange(difference.keys, case_value(value, where) if found else None,
                                    delete=not found))
        labels.append(where + (" removed" if not found else ""))
    if not changes:
        return None
    return CaseUpdate(path, digest, case.index, case.name, UpdateKind.VALUES, tuple(changes),
                      tuple(labels))


def _lookup(state: Any, keys: tuple[Any, ...]) -> tuple[bool, Any]:
    value = state
    for key in keys:
        in_mapping = isinstance(value, Mapping) and key in value
        in_list = isinstance(value, (list, tuple)) and isinstance(key, int) and 0 <= key < len(value)
        if not (in_mapping or in_list):
            return False, None
        value = value[key]
    return True, value


def _key_path(keys: tuple[Any, ...]) -> str:
    path = ""
    for key in keys:
        path = f"{path}[{key}]" if isinstance(key, int) and path else join_key(path, key)
    return path or "expect"


def case_value(value: Any, where: str) -> Any:
    """``value`` as a case file can hold it: mappings, lists, strings, numbers, booleans, null.

    Tuples become lists (``expect`` compares them alike). Anything else —
    a set, bytes, an object, a non-finite float, a key that is not a
    string, number or boolean — raises ``UnrecordableValue`` naming where.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UnrecordableValue(f"{where or 'the final state'} is {value!r}, which "
                                    "expect cannot match (it equals nothing)")
        return value
    if isinstance(value, Mapping):
        converted = {}
        for key, item in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise UnrecordableValue(f"{where or 'the final state'} has a key of type "
                                        f"{type(key).__name__} ({key!r}), which YAML cannot hold")
            converted[key] = case_value(item, join_key(where, key))
        return converted
    if isinstance(value, (list, tuple)):
        return [case_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise UnrecordableValue(f"{where or 'the final state'} is a {type(value).__name__}, "
                            "which a case file cannot hold")


class UpdateLedger:
    """The case updates of one pytest process (a controller merges its workers')."""

    def __init__(self) -> None:
        self._updates: dict[tuple[str, int], CaseUpdate] = {}

    def add(self, update: CaseUpdate) -> None:
        """Keep ``update`` (a case updated twice keeps its last update)."""
        self._updates[(update.path, update.index)] = update

    def to_plain(self) -> list[dict[str, Any]]:
        """Plain data for the trip from an xdist worker."""
        return [update.to_plain() for update in self._updates.values()]

    def merge_plain(self, plain: list[Mapping[str, Any]]) -> None:
        """Add what another process's ``to_plain`` gave."""
        for item in plain:
            self.add(CaseUpdate.from_plain(item))

    def by_file(self) -> dict[str, list[CaseUpdate]]:
        """The updates grouped by case file (sorted), each file's in case order."""
        files: dict[str, list[CaseUpdate]] = {}
        for key in sorted(self._updates):
            files.setdefault(key[0], []).append(self._updates[key])
        return files

    def __len__(self) -> int:
        return len(self._updates)
