"""What nodes print: getting it out of buffers before a process ends or is killed.

Nodes write through Python's ``sys.stdout`` and ``sys.stderr`` and through
the C library's ``stdout`` (C extensions; Lua's ``print`` writes there and
flushes after each call). Python's streams are block-buffered when they are
not a terminal — the normal case for a worker process, whose output goes to
a pipe or a file — unless ``PYTHONUNBUFFERED`` is set. A worker that ends
with ``os._exit`` (workers do, so that threads a branch abandoned cannot
hold them) or is killed by a watchdog drops whatever is still buffered.

So processes that run branches make their Python streams line-buffered when
they start (every complete line reaches the file descriptor as it is
printed, as on a terminal; a node that prints nothing pays nothing), and
flush every buffer after each branch and before they exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import sys
from collections.abc import Callable


def _standard_streams() -> list[io.TextIOBase]:
    """The current streams and the originals (a node may write to either), each once."""
    out, err = sys.stdout, sys.stderr
    streams = [stream for stream in (out, err) if stream is not None]
    for original in (sys.__stdout__, sys.__stderr__):
        if original is not None and original is not out and original is not err:
            streams.append(original)
    return streams


@functools.cache
def _c_fflush() -> Callable[[None], int] | None:
    try:
        return ctypes.CDLL(None).fflush
    except (OSError, AttributeError):  # no C library to speak of: nothing buffered there
        return None


def flush_node_output() -> None:
    """Write out what Python's standard streams and the C library's streams hold.

    Never raises: a stream a node closed or replaced has nothing more to say.
    """
    # This runs after every branch: try/except costs a fraction of contextlib.suppress.
    for stream in _standard_streams():
        try:  # noqa: SIM105
            stream.flush()
        except Exception:
            pass
    fflush = _c_fflush()
    if fflush is not None:
        fflush(None)  # NULL: every output stream; a failure is its return value, never raised


def line_buffer_node_output() -> None:
    """Make this process's ``sys.stdout`` and ``sys.stderr`` line-buffered.

    A process that runs branches calls this once when it starts (a forked
    worker inherits it): a line a node prints is written out when it ends,
    so a worker killed in the middle of a branch loses at most the text
    after the last newline.
    """
    for stream in _standard_streams():
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(line_buffering=True)
