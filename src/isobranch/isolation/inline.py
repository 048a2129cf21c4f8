"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from ..branch import BranchMonitor, BranchTask, ParallelFlowResult
from ..branch_retry import NotReady
from ..branch_run import run_branch
from ..cancellation import CancelSignal
from ..fanout import run_in_order
from .base import IsolationBackend, set_waker, wait_until_ready


class InlineBackend(IsolationBackend):
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"
    # Its tasks may answer NotReady (a retry waiting): nothing runs meanwhile.
    accepts_not_ready = True
    # Branches run in this process: the state need not pickle.
    crosses_processes = False

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def stream_branches(self, tasks: Iterable[BranchTask], *, max_concurrency: int | None = None,
                        cancel: CancelSignal | None = None
                        ) -> Iterator[tuple[int, ParallelFlowResult]]:
        """Run ``tasks`` one at a time, each built only when the previous one finished.

        A set ``cancel`` stops the running branch as a ``fail_fast`` sibling
        would (at its next node boundary, or in Lua at once) and raises
        ``RunCancelled``. A ``NotReady`` task is waited for here (no other
        branch is running), until it is due or ``cancel`` is set.
        """
        source = iter(tasks)
        woken = threading.Event()
        set_waker(source, woken.set)
        forget_wait = cancel.add_callback(woken.set) if cancel is not None else None
        position = 0
        try:
            for task in source:
                if isinstance(task, NotReady):
                    wait_until_ready(task, woken)
                    if cancel is not None:
                        cancel.raise_if_set()
                    continue
                if cancel is None:
                    yield position, run_branch(task, BranchMonitor())
                    position += 1
                    continue
                cancel.raise_if_set()
                monitor = BranchMonitor()
                forget = cancel.add_callback(monitor.cancelled.cancel)
                try:
                    result = run_branch(task, monitor)
                finally:
                    forget()
                cancel.raise_if_set()
                yield position, result
                position += 1
        finally:
            if forget_wait is not None:
                forget_wait()

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in order; with ``fail_fast`` the rest are cancelled after a failure."""
        return run_in_order(self.stream_branches(tasks), tasks)

    def close(self) -> None:
        """Nothing to release."""

