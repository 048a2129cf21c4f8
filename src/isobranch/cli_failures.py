"""Warning lines on stderr for the branches that failed in a run of the command.

A failed branch is never silent: ``isobranch run`` and ``resume`` hand each
event of the run to a ``FailedBranchWarnings``, which writes one line per
failed branch of a main-path fan-out as that fan-out ends, whether the run
then succeeds or not: the branch's name, its error type and its error. A
run shows at most ``SHOWN`` such lines; when it ends, one more line counts
the failed branches it did not show.

Branches of a fan-out inside a branch get no line of their own: their
fan-in node sees them, and if it fails its error names them, and so does
the failed result of the branch it runs in.
"""

from __future__ import annotations

from typing import Any, TextIO

from .branch import ParallelFlowResult

# Failed branches listed in one run; the rest are counted.
SHOWN = 10
# A longer error is cut, so that a warning stays one line a person reads.
MESSAGE_CHARS = 500
PREFIX = "isobranch: warning: "


class FailedBranchWarnings:
    """Writes a warning line per failed branch of a run's main-path fan-outs to ``stream``."""

    def __init__(self, stream: TextIO, shown: int = SHOWN, *,
                 from_branch_events: bool = False) -> None:
        self.stream = stream
        self.shown = shown
        self.failed = 0
        # ``stream(mode="updates")``: its ``parallel`` events hold no results, so each
        # failed branch's line comes from its ``branch`` event (no error message there).
        self.from_branch_events = from_branch_events

    def update(self, event: dict[str, Any]) -> None:
        """Account for one event of ``CompiledGraph.stream``: a ``parallel`` event's failures
        (or with ``from_branch_events``, a failed branch's ``branch`` event)."""
        kind = event.get("type")
        if self.from_branch_events:
            if kind == "branch" and not event["success"]:
                self._count(f"{PREFIX}branch {event['branch']!r} failed ({event['error_type']})")
            return
        if kind != "parallel":
            return
        for result in event["branches"]:
            if not result.success:
                self._count(failure_line(result))

    def _count(self, line: str) -> None:
        self.failed += 1
        if self.failed <= self.shown:
            self._write(line)

    def close(self) -> None:
        """The run ended (or failed): count the failed branches that had no line."""
        hidden = self.failed - self.shown
        if hidden > 0:
            self._write(f"{PREFIX}{hidden} more failed branch{'es' if hidden > 1 else ''} not "
                        f"shown ({self.failed} in all; --stream lists every branch's result)")

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def failure_line(result: ParallelFlowResult) -> str:
    """One line naming a failed branch, its error type and its error."""
    message = " ".join(str(result.error or "no error message").split())
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS - 3] + "..."
    return f"{PREFIX}branch {result.branch!r} failed ({result.error_type}): {message}"
