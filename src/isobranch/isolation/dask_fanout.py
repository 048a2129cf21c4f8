"""One fan-out on the Dask backend: branches queued from the driver, submitted alone or in
batches, collected, given up on, cancelled.

The backend (``dask.DaskBackend``) owns the client, the graph on the
cluster and the loop that follows tasks; this fan-out decides what to
submit and when: it takes what its ``BatchSizer`` wants from the driver and
keeps ``TASKS_PER_SLOT`` tasks per worker thread submitted.
"""

from __future__ import annotations

import contextlib
import queue
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from ..branch import BranchRun, ParallelFlowResult
from ..error_kinds import ErrorKind
from .base import BackendFanOut, Finished, RunSource
from .dask_batches import TASKS_PER_SLOT, BatchSizer, Followed, FollowedBatch
from .dask_branches import FanOutWatch, FollowedBranch, failed, quietly
from .dask_cluster import Connection


class TaskSubmitter(Protocol):
    """What a fan-out asks of the Dask backend (which owns the client and its lock)."""

    def submit(self, client: Any, plugin: str, branch: FollowedBranch) -> Any: ...

    def submit_batch(self, client: Any, plugin: str, batch: FollowedBatch) -> Any: ...

    def follow_once(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                    results: list[Finished], fan_out: FanOutWatch, timeout: float | None
                    ) -> str | None: ...

    def give_up(self, connection: Connection, plugin: str, pending: dict[Any, Followed],
                branch: FollowedBranch) -> ParallelFlowResult | None: ...

    def stop_running(self, connection: Connection, branches: Iterable[Followed]) -> None: ...

    def forget(self, pending: dict[Any, Followed], futures: list[Any]) -> None: ...

    def release_claims(self, connection: Connection, fan_out: FanOutWatch) -> None: ...


class DaskFanOut(BackendFanOut):
    """One fan-out on a Dask cluster: its branches as tasks, followed by the client.

    ``start`` takes what the driver hands out into a queue (as many as the
    ``BatchSizer`` wants; the driver bounds them by ``max_concurrency``) and
    keeps ``TASKS_PER_SLOT`` tasks per worker thread submitted, each one
    branch or a batch of several (``dask_batches``). Once the cluster is
    lost, every branch left fails alike without being submitted. ``close``
    cancels what is still submitted and, on a cluster isobranch started,
    restarts the workers running it; what is queued is never submitted.
    """

    def __init__(self, backend: TaskSubmitter, source: RunSource, connection: Connection,
                 plugin: str, slots: int) -> None:
        self.slots = slots
        self._backend = backend
        self._source = source
        self._connection = connection
        self._plugin = plugin
        self._sizer = BatchSizer(slots)
        self._watch = FanOutWatch(sizer=self._sizer)
        self._pending: dict[Any, Followed] = {}
        # Taken from the driver, not yet submitted (in the order taken).
        self._queued: deque[BranchRun] = deque()
        self._tasks_at_once = TASKS_PER_SLOT * max(slots, 1)
        # Failed without running: the cluster was lost (why, in ``_lost``).
        self._failed: list[Finished] = []
        self._lost: str | None = None

    def start(self) -> None:
        """Take what the batches need from the driver and submit tasks while there is room
        (or fail every branch taken, once the cluster is lost)."""
        queued, sizer, source = self._queued, self._sizer, self._source
        backend, client, plugin = self._backend, self._connection.client, self._plugin
        while True:
            # Topped up before each task: its size is a share of what is queued.
            wanted = sizer.wanted()
            while len(queued) < wanted and (run := source.take()) is not None:
                run.handle = FollowedBranch(run, self._watch)
                queued.append(run)
            if self._lost is not None:
                while queued:
                    run = queued.popleft()
                    self._failed.append((run, failed(run.handle, self._lost,
                                                     ErrorKind.DASK_ERROR)))
                return
            if not queued or len(self._pending) >= self._tasks_at_once:
                return
            size = min(sizer.next_size(len(queued)), len(queued))
            if size == 1:
                branch = queued.popleft().handle
                self._pending[backend.submit(client, plugin, branch)] = branch
                continue
            batch = FollowedBatch([queued.popleft().handle for _ in range(size)], self._watch)
            self._pending[backend.submit_batch(client, plugin, batch)] = batch

    def collect(self, timeout: float | None) -> list[Finished]:
        """What the cluster finished (at most ``POLL_SECONDS`` of waiting at a time)."""
        if self._failed:
            failed_alike, self._failed = self._failed, []
            return failed_alike
        if not self._pending:
            # Nothing submitted: wait for a retry to be due, or a wake-up.
            with contextlib.suppress(queue.Empty):
                self._watch.finished.get(timeout=timeout)
            return []
        results: list[Finished] = []
        lost = self._backend.follow_once(self._connection, self._plugin, self._pending,
                                         results, self._watch, timeout)
        if lost is not None:
            self._lost = lost  # nothing can run on this cluster any more
        return results

    def wake(self) -> None:
        """End ``collect``'s wait (from any thread)."""
        self._watch.finished.put(None)

    def kill(self, run: BranchRun) -> ParallelFlowResult | None:
        """Give up on ``run``, stuck past its deadline in one call; restart its worker."""
        return self._backend.give_up(self._connection, self._plugin, self._pending, run.handle)

    def close(self, *, cancelled: bool) -> None:
        """Cancel what is still submitted; on a cluster isobranch started, restart the
        workers running it (a fan-out stopped early must not keep them busy); what is
        queued is dropped unsubmitted. The claims its tasks' first runs hold on the
        scheduler are let go (the scheduler has forgotten those tasks, or is told to)."""
        self._queued.clear()
        pending = self._pending
        if pending:
            self._backend.stop_running(self._connection, pending.values())
            futures = list(pending)
            self._backend.forget(pending, futures)
            quietly(self._connection.client.cancel, futures)
        self._backend.release_claims(self._connection, self._watch)
