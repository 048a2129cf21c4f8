"""Keeping the command's standard output for its own JSON.

Nodes may print: Python ``print()``, Lua's ``print`` (which writes through
the C library's ``stdout`` of the Lua VM, not through ``sys.stdout``), or
worker processes that inherited file descriptor 1. Redirecting
``sys.stdout`` alone catches only the first, so the redirection is done on
the descriptor: while a run lasts, fd 1 is a copy of fd 2 (stderr), and the
command writes its own output through a private duplicate of the original
fd 1. Processes started during the run (fork servers, spawned workers,
Dask's local workers) inherit the redirected fd 1; the private duplicate is
close-on-exec, so none of them can write to the real stdout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from .errors import StdoutClosed
from .node_output import flush_node_output


class PrivateStdout:
    """Writes lines to the command's real standard output, unbuffered."""

    def __init__(self, fd: int, encoding: str, errors: str) -> None:
        self._fd = fd
        self._encoding = encoding
        self._errors = errors

    def write_line(self, text: str) -> None:
        """Write ``text`` and a newline, all of it, or raise ``StdoutClosed``."""
        self.write_bytes((text + "\n").encode(self._encoding, self._errors))

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` as it is, all of it, or raise ``StdoutClosed``."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except BrokenPipeError as exc:
            raise StdoutClosed("standard output was closed by its reader") from exc

    def isatty(self) -> bool:
        """True if the real standard output is a terminal."""
        return os.isatty(self._fd)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[PrivateStdout]:
    """Point fd 1 and ``sys.stdout`` at stderr; yield a writer for the real stdout.

    Everything is restored on exit, after flushing what nodes printed (Python
    and C buffers) to stderr.
    """
    flush_node_output()
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    errors = getattr(sys.stdout, "errors", None) or "strict"
    private = os.dup(1)  # not inheritable: children never see the real stdout
    saved_stdout = sys.stdout
    try:
        os.dup2(2, 1)  # inheritable, so processes started meanwhile write to stderr
        sys.stdout = sys.stderr
        yield PrivateStdout(private, encoding, errors)
    finally:
        # What nodes printed, also through the C library (fwrite in C code),
        # must go out while fd 1 still points at stderr.
        flush_node_output()
        sys.stdout = saved_stdout
        os.dup2(private, 1)
        os.close(private)
