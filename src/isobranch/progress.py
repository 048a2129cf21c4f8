"""Live progress lines for running fan-outs (``isobranch run`` on a terminal).

One line per running fan-out on stderr: branches done of total, how many
failed and how many attempts are being retried, the rate and the time
left. It is fed the run's ``branch``, ``branch_retry`` and ``parallel``
events, drawn by tqdm, and never writes to stdout. A branch counts once,
when its last attempt ended, however often it ran.

A line follows the terminal's width. A terminal may report a size of 0
columns (a pseudo-terminal nobody sized: some CI runners, ``docker exec``,
serial consoles); tqdm would then draw nothing at all, so such a terminal
gets lines of a fixed width (``$COLUMNS``, else 80) instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

# The size assumed for a terminal that reports none (as ``shutil.get_terminal_size`` does).
FALLBACK_COLUMNS, FALLBACK_ROWS = 80, 24


def wants_progress(choice: bool | None, stream: TextIO) -> bool:
    """``--progress`` / ``--no-progress`` if given, else whether ``stream`` is a terminal."""
    if choice is not None:
        return choice
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def line_width(stream: TextIO) -> dict[str, Any]:
    """tqdm's width options for lines on ``stream``.

    A terminal that reports its size: follow it (``dynamic_ncols``). One that
    reports 0 columns or rows: a fixed size, ``$COLUMNS`` (else 80) wide. A
    stream that is no terminal (``--progress`` into a file): tqdm's own
    choice, a line as long as its text.
    """
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no terminal, no descriptor, or closed
        return {"dynamic_ncols": True}
    if columns > 1 and rows > 1:
        return {"dynamic_ncols": True}
    return {"ncols": columns if columns > 1 else _columns_from_environment(),
            "nrows": rows if rows > 1 else FALLBACK_ROWS}


def _columns_from_environment() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return FALLBACK_COLUMNS
    return columns if columns > 1 else FALLBACK_COLUMNS


class FanOutProgress:
    """Progress lines of the fan-outs a run's events describe, one per running fan-out.

    Events come from the main path only, where fan-outs run one after
    another; a line is keyed by the fan-in node that its ``parallel`` event
    names when the fan-out is over.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        # Per line: the bar, and counts of [failed branches, retried attempts].
        self._bars: dict[str, tuple[tqdm, list[int]]] = {}

    def update(self, event: dict[str, Any]) -> None:
        """Account for one event of ``CompiledGraph.stream``."""
        kind = event.get("type")
        if kind in ("branch", "branch_retry"):
            key = event["fan_in"]
            entry = self._bars.get(key)
            if entry is None:
                bar = tqdm(total=event["total"], desc=f"{event['fan_out']} -> {key}",
                           unit="branch", file=self.stream, leave=True, mininterval=0.1,
                           **line_width(self.stream))
                entry = self._bars[key] = (bar, [0, 0])
            bar, counts = entry
            if kind == "branch_retry":  # an attempt failed; the branch is not done yet
                counts[1] += 1
                bar.set_postfix(self._postfix(counts), refresh=False)
                return
            if not event["success"]:
                counts[0] += 1
                bar.set_postfix(self._postfix(counts), refresh=False)
            bar.update(1)
        elif kind == "parallel" and event["fan_in"] in self._bars:
            self._finish(event["fan_in"])

    @staticmethod
    def _postfix(counts: list[int]) -> dict[str, int]:
        failed, retried = counts
        postfix = {"failed": failed} if failed else {}
        if retried:
            postfix["retried"] = retried
        return postfix

    def _finish(self, key: str) -> None:
        bar, _ = self._bars.pop(key)
        bar.close()

    def close(self) -> None:
        """End every line still shown (the run ended or failed)."""
        for key in list(self._bars):
            self._finish(key)

    def follow(self, events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass ``events`` through, drawing progress on the way; lines end with the run."""
        try:
            for event in events:
                self.update(event)
                yield event
        finally:
            self.close()
