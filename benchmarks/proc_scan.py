"""Processes and memory as Linux ``/proc`` shows them, for the benchmarks and the tests.

Both need the same facts — which processes live below this one, whether a
pid is gone, this process's resident size — and read them here, one way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields of /proc/PID/stat after the command name)`` of every process.

    ``fields[0]`` is the state (``Z`` for a zombie), ``fields[1]`` the parent
    pid, ``fields[2]`` the process group. A process that ends while the scan
    runs is left out.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name is in parentheses and may itself hold spaces or ")".
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        yield int(entry), fields


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """Like ``process_stats`` without zombies (a zombie is dead; whether it is reaped is another matter)."""
    return ((pid, fields) for pid, fields in process_stats() if fields[0] != "Z")


def is_resource_tracker(pid: int) -> bool:
    """Whether ``pid`` is multiprocessing's resource tracker.

    Dask's spawned workers start it; there is one per interpreter and it lives
    until the interpreter exits: Python's, not a leak of the code under test.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing.resource_tracker" in cmdline.read()
    except OSError:
        return False


def descendants(pid: int | None = None) -> set[int]:
    """Pids of every live process below ``pid`` (default: this process), resource tracker left out."""
    root = os.getpid() if pid is None else pid
    below: dict[int, list[int]] = {}
    for child, fields in live_processes():
        below.setdefault(int(fields[1]), []).append(child)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in below.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {child for child in found if not is_resource_tracker(child)}


def children(pid: int | None = None) -> set[int]:
    """Direct children of ``pid`` (default: this process), reaped or not, resource tracker left out."""
    parent = str(os.getpid() if pid is None else pid)
    return {child for child, fields in process_stats()
            if fields[1] == parent and not is_resource_tracker(child)}


def is_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (it does not exist, or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
