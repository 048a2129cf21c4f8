"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..branch import BranchMonitor, BranchTask, ParallelFlowResult, run_branch
from ..cancellation import CancelSignal
from .base import register_backend, run_in_order


class InlineBackend:
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"
    cancellable = True

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` one at a time, each built only when the previous one finished.

        A set ``cancel`` stops the running branch as a ``fail_fast`` sibling
        would (at its next node boundary, or in Lua at once) and raises
        ``RunCancelled``.
        """
        if cancel is None:
            for position, task in enumerate(tasks):
                yield position, run_branch(task, BranchMonitor())
            return
        for position, task in enumerate(tasks):
            cancel.raise_if_set()
            monitor = BranchMonitor()
            forget = cancel.add_callback(monitor.cancelled.cancel)
            try:
                result = run_branch(task, monitor)
            finally:
                forget()
            cancel.raise_if_set()
            yield position, result

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in order; with ``fail_fast`` the rest are cancelled after a failure."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def close(self) -> None:
        """Nothing to release."""


register_backend("inline", InlineBackend)
