"""Batches of short branches on the Dask backend: how many go in one task, and a batch as
the client follows it.

A Dask task costs the scheduler and the client about a millisecond whatever
it runs, so a map of short branches sends many of them per task. The size
comes from measured branch times (``BatchSizer``): the first tasks carry one
branch each, and while branches are short each finished task lets the next
ones carry more, up to about ``TARGET_TASK_SECONDS`` of work; long branches
stay one per task. No task carries more than a ``2 * slots`` share of what
is queued, so the tail of a fan-out still spreads over every worker.

A batch returns its branches' results together (``FollowedBatch``); each
branch is still followed on its own (its start, its node, its deadline).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from ..branch import ParallelFlowResult
from ..error_kinds import ErrorKind
from .base import Finished
from .dask_branches import FanOutWatch, FollowedBranch, failed

# About how long one task's branches should run: long enough that the
# per-task cost (the scheduler's and client's millisecond, and the run's claim: a
# round trip to the scheduler, several milliseconds on a busy machine) stays near
# one percent of it, short enough that results, events and fail_fast see each
# branch soon after it finished.
TARGET_TASK_SECONDS = 0.2
# How many branches one task carries at most.
MAX_BATCH = 1024
# How much larger a task may be than the largest one measured so far.
GROWTH = 4
# Tasks kept submitted per worker thread: one running and some ready to start, so
# a worker never waits for the client to hear of a result and submit the next.
TASKS_PER_SLOT = 4
# No task takes more than a 1 / (SHARE_PER_SLOT * slots) share of what is queued,
# so the tail of a fan-out still spreads over every worker.
SHARE_PER_SLOT = 2


class BatchSizer:
    """How many branches the next Dask task of one fan-out carries, from measured times."""

    def __init__(self, slots: int) -> None:
        self.slots = max(slots, 1)
        self.size = 1

    def observe(self, branches: int, seconds: float) -> None:
        """A task of ``branches`` branches ran for ``seconds`` on its worker."""
        if branches < 1:
            return
        per_branch = seconds / branches
        fits = int(TARGET_TASK_SECONDS / per_branch) if per_branch > 0 else MAX_BATCH
        # Grow from what was measured (never a jump to a size nobody ran), shrink at once.
        self.size = max(1, min(fits, max(self.size, branches * GROWTH), MAX_BATCH))

    def next_size(self, queued: int) -> int:
        """The size of the next task with ``queued`` branches waiting for one: at most a
        ``1 / (SHARE_PER_SLOT * slots)`` share of them, so no worker idles at the end."""
        share = -(-queued // (SHARE_PER_SLOT * self.slots))
        return max(1, min(self.size, share))

    def wanted(self) -> int:
        """How many branches to hold queued: a full task for each of the
        ``TASKS_PER_SLOT * slots`` tasks kept submitted."""
        return TASKS_PER_SLOT * self.slots * self.size


@dataclass
class FollowedBatch:
    """One Dask task running several branches in a row, as the client follows it."""

    items: list[FollowedBranch]
    fan_out: FanOutWatch
    key: str = ""
    future: Any = None
    # (client-side arrival time, worker address) of each start a worker confirmed.
    # Only the run that claims the batch's key reports a start: at most one.
    starts: list[tuple[float, str]] = field(default_factory=list)

    @property
    def running_on(self) -> str | None:
        """The worker the batch runs on, once it has started."""
        return self.starts[-1][1] if self.starts else None

    def keys(self) -> list[str]:
        """The batch's key and its branches' keys (under which their events arrive)."""
        return [self.key, *(item.key for item in self.items)]


def pack_payloads(payloads: list[dict[str, Any]]) -> bytes:
    """A batch's branch payloads as one pickle: the state they share is in it once, and
    Dask sends bytes as they are instead of walking every value in search of futures
    (which cost more than running a short branch)."""
    try:
        return pickle.dumps(payloads, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an item of a class pickle cannot reach by name: by value, then
        return cloudpickle.dumps(payloads, protocol=pickle.HIGHEST_PROTOCOL)


# What a fan-out's pending futures stand for: a branch alone, or a batch.
Followed = FollowedBranch | FollowedBatch


def branches_of(followed: Iterable[Followed]) -> list[FollowedBranch]:
    """Every branch of ``followed``, the branches of batches one by one."""
    branches: list[FollowedBranch] = []
    for entry in followed:
        if isinstance(entry, FollowedBatch):
            branches.extend(entry.items)
        else:
            branches.append(entry)
    return branches


def describe_task(followed: Followed) -> str:
    """A task as log records name it: its branch, or how many its batch runs."""
    if isinstance(followed, FollowedBatch):
        return f"a batch of {len(followed.items)} branches"
    return f"branch {followed.task.name!r}"


def batch_results(batch: FollowedBatch, value: Any) -> list[Finished]:
    """Each branch's result from what the task of ``batch`` returned (its results and the
    seconds it ran, which the fan-out's sizer is told)."""
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], list)
            and len(value[0]) == len(batch.items)):
        outcomes, seconds = value
        if batch.fan_out.sizer is not None:
            batch.fan_out.sizer.observe(len(outcomes), float(seconds))
        return [(item.run, outcome if isinstance(outcome, ParallelFlowResult) else failed(
                    item, f"the Dask worker returned a {type(outcome).__name__} instead of "
                    f"its result", ErrorKind.DASK_ERROR))
                for item, outcome in zip(batch.items, outcomes, strict=True)]
    return [(item.run, failed(item, f"its result could not be fetched from the cluster: "
                              f"{value}", ErrorKind.DASK_ERROR)) for item in batch.items]
