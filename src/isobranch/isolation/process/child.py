"""The child side of the process backend: the fork server and the worker loop.

Both run in fresh interpreters started by ``launcher``, never in the
caller's process, so a worker inherits none of the caller's threads, locks
or Lua VMs. The fork server imports the engine and unpickles the compiled
graph once, then forks a worker per request; a forked worker already has
the graph and runs branches sent to it over its socket, reporting its
progress (node, Lua deadlines, merged updates) to the parent, whose
watchdog ends it if a deadline passes.

What the two ends say to each other, and how, is ``wire``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ...branch import BranchTask, ParallelFlowResult, without_unsendable_state
from ...error_kinds import ErrorKind
from ...node_output import flush_node_output, line_buffer_node_output
from ...statecopy import find_unpicklable
from ..memory_limit import as_memory_failure, data_limit, out_of_memory_result, raise_oom_score
from . import wire
from .wire import Kind, Request

# Sent as often as a Lua call ends: encoded once.
_LUA_DONE = wire.encode(Kind.LUA_DONE)
# Idle workers and the fork server exit when their parent goes away; busy
# workers are killed by the fork server when it notices.
WORKER_EXIT_GRACE_SECONDS = 2.0
# How often a spawned worker checks that its parent still exists.
PARENT_CHECK_SECONDS = 0.5


def read_init(stream: Any) -> bytes:
    """Read the start-up data the parent writes to stdin; take its sys.path; the graph bytes."""
    sys_path, graph_bytes = wire.decode_init(stream.read())
    sys.path[:] = sys_path
    return graph_bytes


def load_graph(graph_bytes: bytes) -> Any:
    """Unpickle the compiled graph and warm the Lua machinery before any fork."""
    import cloudpickle  # noqa: F401  (functions pickled by value need it importable)

    from ...lua.runtime import compile_sandbox

    graph = pickle.loads(graph_bytes)
    compile_sandbox()
    return graph


class ParentWatchdog:
    """Reports a branch's progress to the parent process, which enforces its deadlines."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # Nested fan-outs run on threads in this worker; frames must not interleave.
        self._lock = threading.Lock()
        # The last merged update, not sent yet: (node, update bytes).
        self._merged: tuple[str, bytes | None] | None = None

    def _send(self, data: bytes) -> None:
        with self._lock:
            self._conn.send_bytes(data)

    def _flush(self) -> None:
        with self._lock:
            merged, self._merged = self._merged, None
        if merged is not None:
            self._send(wire.encode(Kind.MERGED, *merged))

    def node_started(self, node: str) -> None:
        """Tell the parent which node runs (named in a timeout or crash report)."""
        with self._lock:
            merged, self._merged = self._merged, None
        self._send(wire.encode(Kind.NODE, node) if merged is None
                   else wire.encode(Kind.STEP, *merged, node))

    def node_merged(self, node: str, update: dict) -> None:
        """Keep the update for the parent, which rebuilds the state if this worker dies."""
        data = wire.encode_update(update)
        with self._lock:
            previous, self._merged = self._merged, (node, data)
        if previous is not None:  # nested fan-outs: two branches' merges in a row
            self._send(wire.encode(Kind.MERGED, *previous))

    def lua_started(self, chunk: str, deadline: float, limit: float | None,
                    branch_deadline: bool) -> None:
        """Arm the parent's watchdog for one Lua call."""
        self._flush()  # the worker may be ended in it: the state as of now goes first
        self._send(wire.encode(Kind.LUA, chunk, deadline, limit, branch_deadline))

    def lua_finished(self) -> None:
        """Disarm the parent's watchdog."""
        self._send(_LUA_DONE)


def run_task(graph: Any, payload: dict[str, Any], conn: Connection) -> bytes:
    """Run one branch here and return its ``result`` message."""
    task = BranchTask(graph=graph, **payload)
    started = time.monotonic()
    try:
        with data_limit(task.limits.branch_max_memory):
            result = graph.run_branch(task, watchdog=ParentWatchdog(conn))
        result = as_memory_failure(task, result)
    except MemoryError:
        if task.limits.branch_max_memory is None:
            raise
        result = out_of_memory_result(task, (time.monotonic() - started) * 1000.0)
    result = without_unsendable_state(result)
    try:
        return wire.encode(Kind.RESULT, result)
    except Exception as exc:
        try:
            path, reason = find_unpicklable(result.state, "state")
        except RecursionError:
            path, reason = "state", "nested too deeply to pickle"
        failed = ParallelFlowResult(
            branch=result.branch, index=result.index, state={}, success=False,
            error=(f"branch {task.name!r}: its final state cannot be sent back from the "
                   f"worker process: {path}: {reason or exc}"),
            error_type=ErrorKind.STATE_COPY_ERROR, duration_ms=result.duration_ms,
            isolation=result.isolation, worker=result.worker, node=result.node,
            spans=result.spans)
        return wire.encode(Kind.RESULT, failed)


def worker_loop(conn: Connection, graph: Any, *, once: bool) -> int:
    """Serve ``run`` requests until told to exit or the parent goes away."""
    while True:
        try:
            message = wire.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return 0
        if message[0] != Kind.RUN:
            return 0
        reply = run_task(graph, message[1], conn)
        # What the branch printed goes out before its result: the worker may
        # be killed or exit (os._exit) before it writes anything else.
        flush_node_output()
        try:
            conn.send_bytes(reply)
        except OSError:
            return 0  # the parent went away (closed or interrupted): nobody to tell
        if once:
            return 0


def _quiet_signals() -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and
    # closes its pools, so workers must not die half-way through a branch.
    # (They start with SIGINT blocked, see ``interrupts``; ignoring it also
    # covers code in a node that unblocks it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fork_server(control_fd: int) -> int:
    """Load the graph once, then fork workers on request until the parent closes the socket."""
    _quiet_signals()
    raise_oom_score()  # inherited by every worker it forks
    control = socket.socket(fileno=control_fd)
    try:
        graph = load_graph(read_init(sys.stdin.buffer))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            control.send(wire.server_error(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        control.send(wire.SERVER_READY)
    except OSError:
        return 0  # the parent gave up waiting (closed or interrupted)
    children: set[int] = set()
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 64, 1)
        except OSError:
            break
        if not message:
            break
        request, value = wire.parse_request(message)
        try:
            if request is Request.FORK:
                pid = _fork_worker(control, fds[0], graph, once=value)
                children.add(pid)
                control.send(wire.forked_reply(pid))
            elif request is Request.REAP:
                control.send(wire.reaped_reply(_reap(value)))
                children.discard(value)
        except OSError:
            break  # the parent went away mid-request (closed or interrupted)
    _end_children(children)
    return 0


def _fork_worker(control: socket.socket, fd: int, graph: Any, *, once: bool) -> int:
    flush_node_output()  # or every worker would write out a copy of what is buffered
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control.close()
            code = worker_loop(Connection(fd), graph, once=once)
        finally:
            flush_node_output()  # os._exit flushes nothing
            os._exit(code)
    os.close(fd)
    return pid


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _end_children(children: set[int]) -> None:
    """The parent is gone: idle workers exit on their own, busy ones are killed."""
    import time

    deadline = time.monotonic() + WORKER_EXIT_GRACE_SECONDS
    pending = set(children)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pending.discard(pid)
        if pending:
            time.sleep(0.01)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def _exit_with_parent() -> None:
    """End this process if its parent dies: a busy worker has no hook to stop its Lua."""
    parent = os.getppid()

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="isobranch-parent-watch", daemon=True).start()


def spawned_worker(conn_fd: int, once: bool) -> int:
    """A worker started as its own interpreter (``start_method="spawn"``)."""
    _quiet_signals()
    raise_oom_score()
    _exit_with_parent()
    conn = Connection(conn_fd)
    try:
        graph = load_graph(read_init(sys.stdin.buffer))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send_bytes(wire.encode(Kind.INIT_ERROR, f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        conn.send_bytes(wire.encode(Kind.READY))
    except OSError:
        return 0  # the parent gave up waiting (closed or interrupted)
    return worker_loop(conn, graph, once=once)


def main(argv: list[str]) -> int:
    """Entry point of a child interpreter: ``fork-server FD`` or ``worker FD ONCE``.

    The caller ends the process with ``os._exit``; what was printed is flushed here.
    """
    line_buffer_node_output()  # before any fork: forked workers inherit it
    role, fd = argv[0], int(argv[1])
    try:
        if role == "fork-server":
            return fork_server(fd)
        return spawned_worker(fd, once=argv[2] == "1")
    finally:
        flush_node_output()
