"""The process backend's wire protocol: every message kind, the framing, encoding and decoding.

Both ends of every connection (the parent, the fork server, a worker) build
and read their messages here and nowhere else.

Parent and worker: every message is one pickled tuple whose first item is
its ``Kind`` (sent as the plain string), in a ``multiprocessing.connection``
frame (a 4-byte big-endian length, then the bytes).

* parent -> worker: ``("run", payload)`` (a ``BranchTask.payload()``);
  any other message, or a closed connection, tells the worker to exit.
* worker -> parent: ``("node", name)``; ``("lua", chunk, deadline, limit,
  branch_deadline)`` arms the watchdog for one Lua call, ``("lua_done",)``
  disarms it; ``("merged", node, update_bytes)``; ``("step", node,
  update_bytes, next_node)`` (a merge and the next node in one frame);
  ``("result", ParallelFlowResult)``. A node's merged update is held back
  until something else is sent (the next node, a Lua call) and dropped
  when the result follows: the result carries the whole state.
* a spawned worker -> parent, once: ``("ready",)`` or ``("init_error", text)``.

A new interpreter (the fork server, a spawned worker) first reads its
start-up data from stdin: one pickled dict of the parent's ``sys.path`` and
the pickled graph. A merged update travels pickled on its own
(``encode_update``), so the parent can rebuild a dead worker's state from
the updates it can unpickle.

The fork server speaks over a ``SOCK_SEQPACKET`` control socket:
``F0``/``F1`` plus one passed file descriptor forks a worker (``1``: it runs
one branch, then exits) and is answered ``P`` + pid; ``S`` + pid reaps that
worker and is answered ``S`` + its raw wait status. At start it says ``R``
(the graph is loaded) or ``E`` + the error.
"""

from __future__ import annotations

import os
import pickle
import struct
from collections.abc import Iterable
from enum import Enum, StrEnum
from multiprocessing.connection import Connection
from typing import Any

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class Kind(StrEnum):
    """The kind of a parent <-> worker message (each member equals its string)."""

    RUN = "run"  # parent -> worker: run a branch
    EXIT = "exit"  # parent -> worker: stop
    NODE = "node"  # worker -> parent: a node started
    LUA = "lua"  # a Lua call started: arm the watchdog
    LUA_DONE = "lua_done"  # the Lua call returned: disarm it
    MERGED = "merged"  # a node's update was merged
    STEP = "step"  # MERGED and NODE in one frame
    RESULT = "result"  # the branch's ParallelFlowResult
    READY = "ready"  # a spawned worker loaded the graph
    INIT_ERROR = "init_error"  # it could not


def encode(kind: Kind, *fields: Any) -> bytes:
    """One message as the bytes of a frame (the kind travels as its plain string)."""
    return pickle.dumps((kind.value, *fields), protocol=_PROTOCOL)


def decode(data: bytes) -> tuple[Any, ...]:
    """A message from the bytes of a frame; its first item compares equal to its ``Kind``.

    Unpickling may raise (an exception class that cannot be rebuilt here).
    """
    return pickle.loads(data)


def run_message(payload: dict[str, Any]) -> bytes:
    """The ``run`` message of a branch (``BranchTask.payload()``)."""
    return pickle.dumps((Kind.RUN.value, payload), protocol=_PROTOCOL)


def encode_update(update: dict) -> bytes | None:
    """A node's merged update for a ``merged``/``step`` message; None if it cannot be pickled
    (the branch's final state then fails to pickle too, and that is what gets reported)."""
    try:
        return pickle.dumps(update, protocol=_PROTOCOL)
    except Exception:
        return None


def decode_update(data: bytes) -> dict:
    """A merged update from its bytes (may raise: a class that cannot be rebuilt here)."""
    return pickle.loads(data)


def init_payload(sys_path: list[str], graph_bytes: bytes) -> bytes:
    """The start-up data a new interpreter reads from stdin."""
    return pickle.dumps({"sys_path": sys_path, "graph": graph_bytes}, protocol=_PROTOCOL)


def decode_init(data: bytes) -> tuple[list[str], bytes]:
    """``(sys.path, graph bytes)`` from the start-up data."""
    init = pickle.loads(data)
    return init["sys_path"], init["graph"]


# -- framing ------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct("!i")


def send_frames(conn: Connection, messages: Iterable[bytes]) -> None:
    """Send ``messages`` as ``Connection.send_bytes`` would, one after another, in one write.

    The frames are ``multiprocessing.connection``'s, so the worker reads them
    with ``recv_bytes``. Only for small messages, which a socket takes
    without blocking long.
    """
    data = b"".join(_FRAME_HEADER.pack(len(message)) + message for message in messages)
    view = memoryview(data)
    while view:
        view = view[os.write(conn.fileno(), view):]


# -- the fork server's control socket ------------------------------------------------------

PID = struct.Struct("!q")
STATUS = struct.Struct("!i")
SERVER_READY = b"R"
SERVER_ERROR = b"E"
_FORK = b"F"
_FORKED = b"P"
_REAP = b"S"
# The longest start-up error the fork server sends (a SEQPACKET datagram).
MAX_ERROR_BYTES = 60000


def fork_request(*, once: bool) -> bytes:
    """Ask the fork server for a worker (sent with the worker's socket as a passed fd)."""
    return _FORK + (b"1" if once else b"0")


def reap_request(pid: int) -> bytes:
    """Ask the fork server to reap worker ``pid``."""
    return _REAP + PID.pack(pid)


def server_error(text: str) -> bytes:
    """The fork server's answer when it could not load the graph."""
    return SERVER_ERROR + text.encode("utf-8", "replace")[:MAX_ERROR_BYTES]


def forked_reply(pid: int) -> bytes:
    """The fork server's answer to a fork request."""
    return _FORKED + PID.pack(pid)


def reaped_reply(status: int) -> bytes:
    """The fork server's answer to a reap request: the raw wait status."""
    return _REAP + STATUS.pack(status)


class Request(Enum):
    """What the parent asks the fork server."""

    FORK = "fork"  # a new worker; the value that comes with it: whether it runs one branch only
    REAP = "reap"  # wait for a worker; the value: its pid
    UNKNOWN = "unknown"


def parse_request(message: bytes) -> tuple[Request, Any]:
    """A control request and the value that comes with it."""
    kind = message[:1]
    if kind == _FORK:
        return Request.FORK, message[1:2] == b"1"
    if kind == _REAP:
        return Request.REAP, PID.unpack(message[1:])[0]
    return Request.UNKNOWN, None


def parse_forked(reply: bytes) -> int | None:
    """The pid in the fork server's answer to a fork request (None: it is gone)."""
    return PID.unpack(reply[1:])[0] if reply[:1] == _FORKED else None


def parse_reaped(reply: bytes) -> int | None:
    """The wait status in the answer to a reap request (None: the fork server is gone)."""
    return STATUS.unpack(reply[1:])[0] if reply[:1] == _REAP else None
