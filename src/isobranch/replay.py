"""Recorded nodes: a node marked ``replay`` returns what it returned when it was recorded.

A run's recordings are a ``Tape``: per call key (the node's path, inside a
branch under the branch's name: ``model``, ``call[3]``, ``review[3]/score``)
the updates of its calls in order, as JSON values of the checkpoint codec.
With mode ``REPLAY`` such a node never runs: its call returns the recorded
update, and a missing one fails the node. With mode ``RECORD`` it runs and
its update is appended. Branches get a tape of their own (``for_branch``)
that travels with the branch task to wherever it runs; what a branch
recorded comes back in its result (``ParallelFlowResult.recordings``) and
is ``absorb``-ed by the tape of the run.

A ``Cassette`` is a file of tapes, one per case: the pytest plugin keeps
one next to each case file (``test_x.agent.cassette.json``); a program can
use one directly (docs/regression-testing.md).
"""

from __future__ import annotations

import json
import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Any

from .checkpoint.codec import decode_value, encode_value
from .errors import GraphError, MissingRecording

CASSETTE_FORMAT = "isobranch-cassette"
CASSETTE_VERSION = 1


class ReplayMode(StrEnum):
    """What a tape does with the calls of recorded nodes."""

    RECORD = "record"  # run the node, keep its update
    REPLAY = "replay"  # return the kept update; never run the node


class Tape:
    """One run's recordings of its ``replay`` nodes (see the module docstring).

    ``recorded``: ``{call key: [update as plain JSON, ...]}`` to replay;
    ``source`` names where they come from and ``hint`` how to record what
    is missing, for the error of a missing recording.
    """

    def __init__(self, mode: ReplayMode | str, recorded: dict[str, list[Any]] | None = None, *,
                 source: str = "the tape", hint: str = "record it first") -> None:
        self.mode = ReplayMode(mode)
        self.recorded = recorded if recorded is not None else {}
        self.source = source
        self.hint = hint
        # What this run (or branch attempt) recorded, and each key's calls so far.
        self.new: dict[str, list[Any]] = {}
        self._calls: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # A branch's tape crosses to workers: its own recordings start empty there.
        return {"mode": self.mode, "recorded": self.recorded, "source": self.source,
                "hint": self.hint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["mode"], state["recorded"], source=state["source"],  # type: ignore[misc]
                      hint=state["hint"])

    def for_branch(self) -> Tape:
        """A tape for one branch attempt: the same recordings, nothing recorded yet."""
        return Tape(self.mode, self.recorded, source=self.source, hint=self.hint)

    def next_call(self, key: str) -> int:
        """The number (from 0) of this call of ``key``, counting it."""
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        return call

    def play(self, key: str, call: int) -> Any:
        """The update recorded for call ``call`` of ``key``; ``MissingRecording`` if none."""
        calls = self.recorded.get(key)
        if calls is None or call >= len(calls):
            raise MissingRecording(f"no recording of its call {call + 1} (as {key!r}) in "
                                   f"{self.source}; {self.hint}")
        return decode_value(json.dumps(calls[call]))

    def record(self, key: str, call: int, update: Any) -> None:
        """Keep ``update``, what call ``call`` of ``key`` returned (``StateEncodeError`` if
        the codec cannot write it)."""
        plain = json.loads(encode_value(update, path="update"))
        calls = self.new.setdefault(key, [])
        calls.extend([None] * (call + 1 - len(calls)))
        calls[call] = plain

    def absorb(self, recordings: dict[str, list[Any]]) -> None:
        """Add what a branch recorded (its keys are its own, under the branch's name)."""
        self.new.update(recordings)


class Cassette:
    """A JSON file of recordings per case: ``{"cases": {case: {call key: [update, ...]}}}``.

    ``tape(case, mode)`` is the tape of one run of that case (give it as
    ``config={"replay": tape}``); ``keep(case, tape)`` takes what a
    recording run recorded, and ``save()`` writes the file whole (a
    temporary file beside it, then a rename). A file that is not a
    cassette is a ``GraphError`` naming it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.fspath(path))
        self.cases: dict[str, dict[str, list[Any]]] = read_cassette(self.path)

    def tape(self, case: str, mode: ReplayMode | str = ReplayMode.REPLAY, *,
             hint: str = "run it once with a tape in record mode") -> Tape:
        """The tape of one run of ``case``."""
        return Tape(mode, self.cases.get(case, {}), source=f"{str(self.path)!r} case {case!r}",
                    hint=hint)

    def keep(self, case: str, tape: Tape) -> None:
        """Take what ``tape`` recorded as ``case``'s recordings (replacing the old ones)."""
        self.cases[case] = dict(tape.new)

    def save(self) -> None:
        """Write the file whole or not at all."""
        write_cassette(self.path, self.cases)


def read_cassette(path: Path) -> dict[str, dict[str, list[Any]]]:
    """The cases of the cassette at ``path`` (none if there is no file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise GraphError(f"cassette {str(path)!r} cannot be read: {exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise GraphError(f"cassette {str(path)!r} is not JSON: {exc}") from exc
    if (not isinstance(document, dict) or document.get("format") != CASSETTE_FORMAT
            or not isinstance(document.get("cases"), dict)):
        raise GraphError(f"cassette {str(path)!r} is not an isobranch cassette (it needs "
                         f"\"format\": {CASSETTE_FORMAT!r} and \"cases\")")
    if document.get("version") != CASSETTE_VERSION:
        raise GraphError(f"cassette {str(path)!r} has version {document.get('version')!r}; "
                         f"this isobranch reads version {CASSETTE_VERSION}")
    cases = document["cases"]
    for case, calls in cases.items():
        if not isinstance(calls, dict) or not all(isinstance(v, list) for v in calls.values()):
            raise GraphError(f"cassette {str(path)!r}: case {case!r} must map call keys to "
                             f"lists of updates")
    return cases


def cassette_text(cases: dict[str, dict[str, list[Any]]]) -> str:
    """A cassette's file content: sorted and indented, so a re-recording diffs well."""
    return json.dumps({"format": CASSETTE_FORMAT, "version": CASSETTE_VERSION, "cases": cases},
                      indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_cassette(path: Path, cases: dict[str, dict[str, list[Any]]]) -> None:
    """Write a cassette whole or not at all (a temporary file beside it, then a rename)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        temporary.write_text(cassette_text(cases), encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
