"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from ..branch import BranchMonitor, BranchTask, ParallelFlowResult, run_branch
from .base import NotReady, register_backend, run_in_order, set_waker, wait_until_ready


class InlineBackend:
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"
    # Its tasks may answer NotReady (a retry waiting): nothing runs meanwhile.
    accepts_not_ready = True

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` one at a time, each built only when the previous one finished.

        A ``NotReady`` task is waited for here: no other branch is running.
        """
        source = iter(tasks)
        woken = threading.Event()
        set_waker(source, woken.set)
        position = 0
        for task in source:
            if isinstance(task, NotReady):
                wait_until_ready(task, woken)
                continue
            yield position, run_branch(task, BranchMonitor())
            position += 1

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in order; with ``fail_fast`` the rest are cancelled after a failure."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def close(self) -> None:
        """Nothing to release."""


register_backend("inline", InlineBackend)
