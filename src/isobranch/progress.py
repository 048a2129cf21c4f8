"""Live progress lines for running fan-outs (``isobranch run`` on a terminal).

One line per running fan-out on stderr: branches done of total, how many
failed and how many attempts are being retried, the rate and the time
left. It is fed the run's ``branch``, ``branch_retry`` and ``parallel``
events, drawn by tqdm, and never writes to stdout. A branch counts once,
when its last attempt ended, however often it ran.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


def wants_progress(choice: bool | None, stream: TextIO) -> bool:
    """``--progress`` / ``--no-progress`` if given, else whether ``stream`` is a terminal."""
    if choice is not None:
        return choice
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


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
                           unit="branch", file=self.stream, leave=True, dynamic_ncols=True,
                           mininterval=0.1)
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
