"""What one pytest process gathers across cases: graph coverage, expectation updates, recordings.

The plugin keeps one ``SessionRecords`` per pytest process. An xdist
worker sends ``to_plain()`` to the controller when its session ends, which
merges it (``merge_plain``) into its own; the controller then writes the
updated case files (``write_updates``: each file once) and reports. A
later per-case artefact (recorded node calls, say) would travel the same
way, as another key of the plain data: so do the recordings of
``--isobranch-record`` (cassettes.py), each cassette written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..replay import ReplayMode, Tape
from .case_file import Case
from .case_rewrite import CaseRewriteError, file_digest, rewrite_case_file, round_trip_problem
from .cassettes import CassetteShelf, CassetteWriteResult, RecordingLedger
from .coverage import CoverageLedger, GraphShape, ShapedGraph, graph_shape
from .running import RunRecord
from .updates import CaseUpdate, UnrecordableValue, UpdateLedger, plan_update


@dataclass(frozen=True)
class FileUpdateResult:
    """What ``write_updates`` did with one case file: its updated cases, or why not."""

    path: str
    updates: tuple[CaseUpdate, ...]
    error: str | None = None


class SessionRecords:
    """Coverage (when asked for) and case updates (when asked for) of one pytest process."""

    def __init__(self, *, coverage: bool, update: bool, record: bool = False) -> None:
        self.coverage = CoverageLedger() if coverage else None
        self.updates = UpdateLedger() if update else None
        # --isobranch-record: what the cases recorded; else the cassettes they replay.
        self.recordings = RecordingLedger() if record else None
        self._cassettes = CassetteShelf()
        # Files this process refused to update, with the reason (reported once each).
        self.refused: dict[str, str] = {}
        self._shapes: dict[int, tuple[ShapedGraph, GraphShape]] = {}
        self._rewritable: dict[str, tuple[str, str | None]] = {}

    def observe(self, agent: str, graph: ShapedGraph, record: RunRecord) -> None:
        """Count ``record``, a run of ``graph`` (the agent ``agent``), for coverage."""
        if self.coverage is None:
            return
        known = self._shapes.get(id(graph))
        if known is None or known[0] is not graph:
            known = self._shapes[id(graph)] = (graph, graph_shape(graph))
        self.coverage.observe(agent, known[1], record)

    def tape(self, case_file: Path, case: str) -> Tape:
        """The tape of one run of ``case``: recording under ``--isobranch-record``, else
        replaying its cassette (``GraphError`` for an unreadable cassette)."""
        mode = ReplayMode.RECORD if self.recordings is not None else ReplayMode.REPLAY
        return self._cassettes.tape(case_file, case, mode)

    def recorded(self, case_file: Path, case: str, tape: Tape) -> None:
        """Keep what one recording run of ``case`` recorded."""
        if self.recordings is not None:
            self.recordings.add(case_file, case, tape)

    def write_recordings(self) -> list[CassetteWriteResult]:
        """Write every cassette that has new recordings, once each."""
        return self.recordings.write() if self.recordings is not None else []

    def agent_not_loaded(self, agent: str, message: str) -> None:
        """Note, for coverage, an agent that cannot be loaded."""
        if self.coverage is not None:
            self.coverage.agent_not_loaded(agent, message)

    def update(self, case: Case, record: RunRecord, path: Path) -> CaseUpdate | str | None:
        """Plan the update that makes failing ``case`` pass and keep it.

        Returns the update, a reason why the case cannot be updated (a
        value YAML cannot hold, a file that does not round-trip), or None
        when no update applies (the agent failed, the case expects an error).
        """
        if self.updates is None:
            return None
        digest, problem = self._check_file(path)
        if problem is not None:
            self.refused.setdefault(str(path), problem)
            return f"{path.name} is left alone: {problem}"
        try:
            update = plan_update(case, record, path=str(path), digest=digest)
        except UnrecordableValue as exc:
            return f"cannot write the final state into the case file: {exc}"
        if update is not None:
            self.updates.add(update)
        return update

    def _check_file(self, path: Path) -> tuple[str, str | None]:
        key = str(path)
        if key not in self._rewritable:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                self._rewritable[key] = ("", f"cannot read it: {exc}")
            else:
                self._rewritable[key] = (file_digest(text), round_trip_problem(text))
        return self._rewritable[key]

    def to_plain(self) -> dict[str, Any]:
        """Plain data for the trip from an xdist worker to the controller."""
        return {"coverage": self.coverage.to_plain() if self.coverage is not None else None,
                "updates": self.updates.to_plain() if self.updates is not None else None,
                "refused": dict(self.refused),
                "recordings": self.recordings.to_plain() if self.recordings is not None else None}

    def merge_plain(self, plain: Mapping[str, Any]) -> None:
        """Add a worker's ``to_plain``."""
        if self.coverage is not None and plain.get("coverage"):
            self.coverage.merge_plain(plain["coverage"])
        if self.updates is not None and plain.get("updates"):
            self.updates.merge_plain(plain["updates"])
        if self.recordings is not None and plain.get("recordings"):
            self.recordings.merge_plain(plain["recordings"])
        for path, reason in (plain.get("refused") or {}).items():
            self.refused.setdefault(path, reason)

    def write_updates(self) -> list[FileUpdateResult]:
        """Write every updated case file once; one result per file, sorted by path."""
        if self.updates is None:
            return []
        results = []
        for path, updates in self.updates.by_file().items():
            try:
                rewrite_case_file(path, updates)
            except (CaseRewriteError, OSError) as exc:
                results.append(FileUpdateResult(path, tuple(updates), str(exc)))
            else:
                results.append(FileUpdateResult(path, tuple(updates)))
        return results
