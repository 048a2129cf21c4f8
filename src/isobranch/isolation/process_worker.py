"""The child side of the process backend: the fork server and the worker loop.

Both run in fresh interpreters started by ``process_pool``, never in the
caller's process, so a worker inherits none of the caller's threads, locks
or Lua VMs. The fork server imports the engine and unpickles the compiled
graph once, then forks a worker per request; a forked worker already has
the graph and runs branches sent to it over its socket, reporting its
progress (node, Lua deadlines, merged updates) to the parent, whose
watchdog ends it if a deadline passes.

Wire format: every message is one pickled tuple in a
``multiprocessing.connection`` frame.

* parent -> worker: ``("run", payload)``; ``("exit",)``.
* worker -> parent: ``("node", name)``, ``("lua", chunk, deadline, limit,
  branch_deadline)``, ``("lua_done",)``, ``("merged", node, update_bytes)``,
  ``("result", ParallelFlowResult)``.

The fork server speaks over a ``SOCK_SEQPACKET`` control socket:
``F0``/``F1`` + one passed file descriptor forks a worker (``1``: it runs
one branch, then exits) and is answered ``P`` + pid; ``S`` + pid reaps that
worker and is answered ``S`` + its raw wait status.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

PID = struct.Struct("!q")
STATUS = struct.Struct("!i")
# Idle workers and the fork server exit when their parent goes away; busy
# workers are killed by the fork server when it notices.
WORKER_EXIT_GRACE_SECONDS = 2.0
# How often a spawned worker checks that its parent still exists.
PARENT_CHECK_SECONDS = 0.5


def read_init(stream: Any) -> dict[str, Any]:
    """Read the start-up payload the parent writes to stdin: sys.path and the graph."""
    data = stream.read()
    init = pickle.loads(data)
    sys.path[:] = init["sys_path"]
    return init


def load_graph(init: dict[str, Any]) -> Any:
    """Unpickle the compiled graph and warm the Lua machinery before any fork."""
    import cloudpickle  # noqa: F401  (functions pickled by value need it importable)

    from ..lua.runtime import _sandbox_bytecode

    graph = pickle.loads(init["graph"])
    _sandbox_bytecode()
    return graph


class ParentWatchdog:
    """Reports a branch's progress to the parent process, which enforces its deadlines."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # Nested fan-outs run on threads in this worker; frames must not interleave.
        self._lock = threading.Lock()

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._conn.send_bytes(data)

    def node_started(self, node: str) -> None:
        """Tell the parent which node runs (named in a timeout or crash report)."""
        self._send(("node", node))

    def node_merged(self, node: str, update: dict) -> None:
        """Send the update so the parent can rebuild the state if this worker dies."""
        try:
            data = pickle.dumps(update, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = None  # reported when the final state fails to pickle
        self._send(("merged", node, data))

    def lua_started(self, chunk: str, deadline: float, limit: float | None,
                    branch_deadline: bool) -> None:
        """Arm the parent's watchdog for one Lua call."""
        self._send(("lua", chunk, deadline, limit, branch_deadline))

    def lua_finished(self) -> None:
        """Disarm the parent's watchdog."""
        self._send(("lua_done",))


def run_task(graph: Any, payload: dict[str, Any], conn: Connection) -> bytes:
    """Run one branch here and return its pickled ``("result", ...)`` message."""
    from ..branch import BranchTask, ParallelFlowResult, run_branch, without_unsendable_state
    from ..statecopy import find_unpicklable

    task = BranchTask(graph=graph, **payload)
    result = without_unsendable_state(run_branch(task, watchdog=ParentWatchdog(conn)))
    try:
        return pickle.dumps(("result", result), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        try:
            path, reason = find_unpicklable(result.state, "state")
        except RecursionError:
            path, reason = "state", "nested too deeply to pickle"
        failed = ParallelFlowResult(
            branch=result.branch, state={}, success=False,
            error=(f"branch {task.label!r}: its final state cannot be sent back from the "
                   f"worker process: {path}: {reason or exc}"),
            error_type="StateCopyError", duration_ms=result.duration_ms,
            isolation=result.isolation, worker=result.worker, node=result.node)
        return pickle.dumps(("result", failed), protocol=pickle.HIGHEST_PROTOCOL)


def worker_loop(conn: Connection, graph: Any, *, once: bool) -> int:
    """Serve ``run`` requests until told to exit or the parent goes away."""
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return 0
        if message[0] != "run":
            return 0
        conn.send_bytes(run_task(graph, message[1], conn))
        if once:
            return 0


def _quiet_signals() -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and
    # closes its pools, so workers must not die half-way through a branch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def fork_server(control_fd: int) -> int:
    """Load the graph once, then fork workers on request until the parent closes the socket."""
    _quiet_signals()
    control = socket.socket(fileno=control_fd)
    try:
        graph = load_graph(read_init(sys.stdin.buffer))
    except BaseException as exc:
        control.send(b"E" + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:60000])
        return 1
    control.send(b"R")
    children: set[int] = set()
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(control, 64, 1)
        except OSError:
            break
        if not message:
            break
        kind = message[:1]
        if kind == b"F":
            pid = _fork_worker(control, fds[0], graph, once=message[1:2] == b"1")
            children.add(pid)
            control.send(b"P" + PID.pack(pid))
        elif kind == b"S":
            pid = PID.unpack(message[1:])[0]
            control.send(b"S" + STATUS.pack(_reap(pid)))
            children.discard(pid)
    _end_children(children)
    return 0


def _fork_worker(control: socket.socket, fd: int, graph: Any, *, once: bool) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control.close()
            code = worker_loop(Connection(fd), graph, once=once)
        finally:
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
    _exit_with_parent()
    conn = Connection(conn_fd)
    try:
        graph = load_graph(read_init(sys.stdin.buffer))
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("init_error", f"{type(exc).__name__}: {exc}")))
        return 1
    conn.send_bytes(pickle.dumps(("ready",)))
    return worker_loop(conn, graph, once=once)


def main(argv: list[str]) -> int:
    """Entry point of a child interpreter: ``fork-server FD`` or ``worker FD ONCE``."""
    role, fd = argv[0], int(argv[1])
    if role == "fork-server":
        return fork_server(fd)
    return spawned_worker(fd, once=argv[2] == "1")
