"""The failure kinds the engine itself reports as a branch's ``error_type``.

``ParallelFlowResult.error_type`` is a plain string (the class name of
whatever failed, which may exist only where the branch ran), so users and
pickling see strings. The kinds below are the engine's own; code compares
against these members, never against bare strings.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    """An ``error_type`` the engine reports itself (each member equals its string)."""

    # A branch stopped because of another one, or its fan-out closed; never a cause itself.
    CANCELLED = "Cancelled"
    # A process-backend worker died while it ran the branch.
    WORKER_CRASHED = "WorkerCrashed"
    # A Dask worker died while it ran the branch.
    WORKER_DIED = "WorkerDied"
    # The branch ran past its branch_timeout.
    BRANCH_TIMEOUT = "BranchTimeout"
    # The branch ran past its branch_max_memory.
    BRANCH_MEMORY_ERROR = "BranchMemoryError"
    # The state (or a result) could not be copied or sent between processes.
    STATE_COPY_ERROR = "StateCopyError"
    # The Dask cluster failed the branch (not the branch's own code).
    DASK_ERROR = "DaskError"
    # Lua ran past its timeout (the watchdog of the process backend ended it).
    LUA_TIMEOUT_ERROR = "LuaTimeoutError"
    # The branch paused for answers (interrupt()); it is resumed, never retried.
    INTERRUPTED = "Interrupted"


def plain(error_type: str | None) -> str | None:
    """``error_type`` as an exact ``str`` (a member becomes its value), so results hold strings."""
    return error_type.value if isinstance(error_type, ErrorKind) else error_type
