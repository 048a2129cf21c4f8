"""The inline backend: branches run one after another in the caller's thread."""

from __future__ import annotations

from ..branch import (
    BranchMonitor,
    BranchTask,
    ParallelFlowResult,
    cancelled_result,
    run_branch,
)
from .base import register_backend


class InlineBackend:
    """Runs each branch in the calling thread, in declaration order.

    Isolation comes from ``run_branch`` itself (fresh context and state copy);
    ``branch_timeout`` is cooperative: Lua is stopped by its hook and Python
    nodes are checked between nodes.
    """

    name = "inline"

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max_workers  # accepted for a uniform factory signature

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]:
        """Run ``tasks`` in order; with ``fail_fast`` the rest are cancelled after a failure."""
        results: list[ParallelFlowResult] = []
        failed: ParallelFlowResult | None = None
        for task in tasks:
            if failed is not None:
                results.append(cancelled_result(
                    task, f"cancelled: branch {failed.branch!r} failed first (fail_fast)"))
                continue
            result = run_branch(task, BranchMonitor())
            results.append(result)
            if not result.success and task.limits.fail_fast:
                failed = result
        return results

    def close(self) -> None:
        """Nothing to release."""


register_backend("inline", InlineBackend)
