"""``branch_max_memory``: how a worker process caps a branch's memory, and how that is reported.

A worker process enforces the limit with ``RLIMIT_DATA``, set just before
the branch runs to the worker's current data size plus the limit and put
back afterwards. The kernel then refuses the allocation that would pass it,
at the allocation itself: Python raises ``MemoryError`` and nothing grows
past the limit, however fast it allocates. A watchdog sampling the worker's
resident size could only notice after the fact, by which time one large
allocation may already have pushed the machine into swap or the OOM killer.
``RLIMIT_AS`` is not used: it counts address space that is only reserved
(every thread's 64 MiB malloc arena, guard pages), so a nested fan-out's
threads would hit it without using any memory.

Whatever the cause, the branch's failure is reported as ``BranchMemoryError``,
naming the branch, its node and the limit.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from ..branch import ParallelFlowResult, failed_result
from ..error_kinds import ErrorKind
from ..errors import ConfigError
from ..sizes import parse_size
from .endings import describe_signal

if TYPE_CHECKING:
    from ..branch import BranchTask
    from .base import IsolationBackend

# Kept as a name of this module: the process and dask backends and tests use it.
BRANCH_MEMORY_ERROR = ErrorKind.BRANCH_MEMORY_ERROR
# Written to a worker's /proc/self/oom_score_adj (-1000..1000): when the
# machine runs out of memory, the kernel kills a worker before the caller.
WORKER_OOM_SCORE_ADJ = 1000
_VMDATA = re.compile(rb"^VmData:\s+(\d+) kB$", re.MULTILINE)
_OOM_KILLS = re.compile(rb"^oom_kill (\d+)$", re.MULTILINE)


def format_size(size: int) -> str:
    """``268435456`` -> ``"256 MiB"`` (exact binary units when they fit, else bytes)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MiB"
    return f"{size} bytes"


def raise_oom_score(score: int = WORKER_OOM_SCORE_ADJ) -> None:
    """Make this process the kernel's first choice when memory runs out (best effort).

    Raising the score needs no privilege; a score already higher is kept.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/oom_score_adj", "r+") as adj:
        if int(adj.read().strip() or 0) < score:
            adj.seek(0)
            adj.write(str(score))


def _proc_number(path: str, pattern: re.Pattern[bytes]) -> int | None:
    """The number ``pattern`` captures in the ``/proc`` file ``path`` (None if absent)."""
    try:
        with open(path, "rb") as file:
            match = pattern.search(file.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def data_size() -> int | None:
    """This process's data size in bytes (``VmData``, what ``RLIMIT_DATA`` is measured against)."""
    kib = _proc_number("/proc/self/status", _VMDATA)
    return kib * 1024 if kib is not None else None


@contextlib.contextmanager
def data_limit(limit: int | None) -> Iterator[None]:
    """Let the code in the block allocate at most ``limit`` more bytes (None: no limit)."""
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    current = data_size()
    if current is None:  # no /proc: the limit counts the whole process
        current = 0
    cap = current + limit
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def kernel_oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (``/proc/vmstat``)."""
    return _proc_number("/proc/vmstat", _OOM_KILLS)


def memory_message(branch_name: str, node: str | None, limit: int, what: str) -> str:
    """``branch 'b': node 'n' ran out of memory (branch_max_memory 256 MiB): <what>``."""
    where = f" in node {node!r}" if node else ""
    return (f"branch {branch_name!r} ran out of memory{where} (branch_max_memory "
            f"{format_size(limit)}): {what}")


def as_memory_failure(task: BranchTask, result: ParallelFlowResult) -> ParallelFlowResult:
    """``result`` reported as ``BranchMemoryError`` if it failed with ``MemoryError`` under a
    limit, or with ``LuaMemoryError`` when the limit is what Lua ran into.

    Everything a branch's Lua VM allocates counts against the limit, so a VM
    whose own ``max_memory`` is at least the limit (or unset) can only be
    refused memory by the limit; a smaller ``max_memory`` is Lua's own error.
    """
    limit = task.limits.branch_max_memory
    if limit is None or result.success:
        return result
    if result.error_type == "LuaMemoryError":
        lua_cap = task.graph.lua_max_memory
        if lua_cap is not None and lua_cap < limit:
            return result
        what = "Lua could not allocate past the limit (LuaMemoryError)"
        return replace(result, error_type=BRANCH_MEMORY_ERROR,
                       error=memory_message(task.name, result.node, limit, what))
    if result.error_type != "MemoryError":
        return result
    # The original text ends in "MemoryError: <its message>", often empty.
    detail = (result.error or "").rpartition("MemoryError")[2].lstrip(": ")
    what = "an allocation past the limit was refused (MemoryError" + (
        f": {detail})" if detail else ")")
    return replace(result, error_type=BRANCH_MEMORY_ERROR,
                   error=memory_message(task.name, result.node, limit, what))


def out_of_memory_result(task: BranchTask, started_ms: float) -> ParallelFlowResult:
    """The result of a branch whose ``MemoryError`` escaped even the code that reports failures."""
    limit = task.limits.branch_max_memory
    assert limit is not None
    return failed_result(
        task, memory_message(task.name, None, limit,
                             "a MemoryError escaped the code that reports the branch"),
        BRANCH_MEMORY_ERROR, duration_ms=started_ms, worker=os.getpid())


def oom_killed(kills_before: int | None, ending: str) -> bool:
    """Whether a worker that ended as ``ending`` was the OOM killer's victim.

    ``kills_before`` is the kernel's OOM-kill count when its branch started
    (None: not counted); a SIGKILL nobody here sent, at a moment the count
    went up, is the OOM killer's doing.
    """
    if kills_before is None or ending != describe_signal(signal.SIGKILL):
        return False
    now = kernel_oom_kills()
    return now is not None and now > kills_before


def parse_limit(value: object) -> int | None:
    """``branch_max_memory`` as bytes: an int, or a size string such as ``"512MiB"``."""
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"branch_max_memory: {exc}") from None


def refusal(backend: IsolationBackend, limit: int) -> str | None:
    """Why ``backend`` cannot enforce a ``branch_max_memory`` of ``limit`` bytes (None: it can),
    as its ``check_branch_max_memory`` says, prefixed for a configuration error."""
    reason = backend.check_branch_max_memory(limit)
    return f"branch_max_memory: {reason}" if reason else None
