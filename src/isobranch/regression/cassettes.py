"""Recorded nodes under the plugin: each case file's cassette, read once, written once.

A case file ``test_x.agent.yaml`` keeps the recordings of its agent's
``replay: true`` nodes in ``test_x.agent.cassette.json`` beside it, per
case (replay.py has the format). By default each case replays its
recordings (``CassetteShelf.tape``: each cassette read once per process);
under ``--isobranch-record`` each case runs them live and its recordings
are gathered (``RecordingLedger``), sent from xdist workers to the
controller as plain data, and each cassette is written once at the end of
the session, whole or not at all: the cases recorded replace their old
entries, the others stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GraphError
from ..replay import ReplayMode, Tape, read_cassette, write_cassette

RECORD_FLAG = "--isobranch-record"
_CASE_FILE_SUFFIXES = (".agent.yaml", ".agent.yml")


def cassette_path(case_file: Path) -> Path:
    """``test_x.agent.cassette.json`` beside ``test_x.agent.yaml``."""
    name = case_file.name
    for suffix in _CASE_FILE_SUFFIXES:
        if name.endswith(suffix):
            return case_file.with_name(name[:-len(suffix)] + ".agent.cassette.json")
    return case_file.with_name(name + ".cassette.json")


class CassetteShelf:
    """The cassettes one pytest process replays from, each read once."""

    def __init__(self) -> None:
        self._cassettes: dict[Path, dict[str, dict[str, list[Any]]]] = {}

    def tape(self, case_file: Path, case: str, mode: ReplayMode) -> Tape:
        """The tape of one run of ``case`` (``GraphError`` for an unreadable cassette)."""
        path = cassette_path(case_file)
        hint = f"record it with: pytest {RECORD_FLAG} {case_file.name}"
        if mode is ReplayMode.RECORD:
            return Tape(mode, {}, source=path.name, hint=hint)
        if path not in self._cassettes:
            self._cassettes[path] = read_cassette(path)
        return Tape(mode, self._cassettes[path].get(case, {}),
                    source=f"{path.name} (case {case!r})", hint=hint)


@dataclass(frozen=True)
class CassetteWriteResult:
    """What ``RecordingLedger.write`` did with one cassette: its recorded cases, or why not."""

    path: str
    cases: tuple[str, ...]
    error: str | None = None


class RecordingLedger:
    """What ``--isobranch-record`` recorded, per cassette and case."""

    def __init__(self) -> None:
        self._recorded: dict[str, dict[str, dict[str, list[Any]]]] = {}

    def add(self, case_file: Path, case: str, tape: Tape) -> None:
        """Keep what ``tape`` recorded in one run of ``case`` (nothing: no entry)."""
        if tape.new:
            self._recorded.setdefault(str(cassette_path(case_file)), {})[case] = dict(tape.new)

    def to_plain(self) -> dict[str, Any]:
        """Plain data for the trip from an xdist worker to the controller."""
        return self._recorded

    def merge_plain(self, plain: Mapping[str, Any]) -> None:
        """Add a worker's ``to_plain``."""
        for path, cases in plain.items():
            self._recorded.setdefault(path, {}).update(cases)

    def write(self) -> list[CassetteWriteResult]:
        """Write each cassette once, sorted by path: its old cases, the recorded ones over them."""
        results = []
        for path, cases in sorted(self._recorded.items()):
            try:
                merged = {**read_cassette(Path(path)), **cases}
                write_cassette(Path(path), merged)
            except (GraphError, OSError) as exc:
                results.append(CassetteWriteResult(path, tuple(sorted(cases)), str(exc)))
            else:
                results.append(CassetteWriteResult(path, tuple(sorted(cases))))
        return results
