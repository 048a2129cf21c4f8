"""Starting, reaping and describing the worker processes of the process backend.

Two start methods, both safe to use from a process that already runs
threads (fork after threads is the hazard: a forked child inherits locks
held by threads that do not exist in it):

* ``forkserver`` (default): one fresh interpreter per pool imports the
  engine and loads the compiled graph once; every worker is a fork of it.
  A new worker costs a fork, not an interpreter start.
* ``spawn``: every worker is a fresh interpreter that loads the graph itself.

Neither goes through ``multiprocessing``'s process start, so the caller's
``__main__`` is never re-imported: no ``if __name__ == "__main__"`` guard is
needed, and scripts, ``python -c``, REPLs and pytest-xdist workers all work.
Functions defined in ``__main__`` travel by value with cloudpickle.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from ...errors import WorkerStartError
from ..endings import describe_signal
from ..interrupts import sigint_blocked
from . import wire
from .wire import Kind

START_METHODS = ("forkserver", "spawn")
# Interpreter start plus imports can be slow on a loaded machine; past this
# the pool gives up with an error instead of hanging.
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
# os._exit: a worker ends at once, without waiting for threads a nested
# fan-out abandoned (interpreter shutdown would join them); main() flushes
# what nodes printed first.
_BOOTSTRAP = ("import os, sys; from isobranch.isolation.process.child import main; "
              "os._exit(main(sys.argv[1:]))")


def describe_wait_status(status: int) -> str:
    """``exited with code 3`` / ``was killed by signal 11 (SIGSEGV)`` from a wait status."""
    if os.WIFSIGNALED(status):
        return describe_signal(os.WTERMSIG(status))
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


class WorkerProcess:
    """The parent's handle on one worker: its pid and its message connection."""

    def __init__(self, pid: int, conn: Connection, launcher: ForkServer | Spawner,
                 popen: subprocess.Popen | None = None) -> None:
        self.pid = pid
        self.conn = conn
        self._launcher = launcher
        self._popen = popen
        self._ending: str | None = None
        # close() on one thread and a fan-out on another may both reap it.
        self._reap_lock = threading.Lock()

    def kill(self) -> None:
        """SIGKILL the worker (a no-op if it is already gone)."""
        if self._ending is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def reap(self) -> str:
        """Wait for the worker to end; close its connection; describe how it ended."""
        with self._reap_lock:
            if self._ending is None:
                self.conn.close()
                self._ending = self._launcher.reap(self)
            return self._ending

    @property
    def popen(self) -> subprocess.Popen | None:
        """The ``Popen`` of a spawned worker; None for a forked one."""
        return self._popen


def _child_environment() -> dict[str, str]:
    # The child must import isobranch before it can read the parent's sys.path.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def write_all(fd: int, data: bytes, timeout: float) -> None:
    """Write ``data`` to the pipe ``fd`` within ``timeout`` seconds, or raise ``TimeoutError``.

    A child that hangs before reading its start-up data must not block the
    parent once the data is larger than the pipe's buffer.
    """
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    view = memoryview(data)
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"the reader took more than {timeout:g}s")
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue


def _start_child(args: list[str], keep_fd: int, graph_bytes: bytes) -> subprocess.Popen:
    # Ctrl-C is the parent's to handle: the child starts with SIGINT blocked
    # (and ignores it once running), so it cannot die half-way through a branch.
    with sigint_blocked():
        process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, *args],
                                   stdin=subprocess.PIPE, pass_fds=(keep_fd,),
                                   env=_child_environment(), close_fds=True)
    assert process.stdin is not None
    try:
        write_all(process.stdin.fileno(), wire.init_payload(list(sys.path), graph_bytes),
                  START_TIMEOUT_SECONDS)
    except TimeoutError as exc:
        process.kill()
        process.wait()
        raise WorkerStartError(f"a new interpreter did not read its start-up data: {exc}") from exc
    except OSError:
        pass  # the child died at start; its own report or exit status says why
    finally:
        process.stdin.close()
    return process


class ForkServer:
    """A preloaded interpreter that forks workers on request (``start_method="forkserver"``)."""

    method = "forkserver"

    def __init__(self, graph_bytes: bytes) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        self._control = parent_end
        try:
            self._process = _start_child(["fork-server", str(child_end.fileno())],
                                         child_end.fileno(), graph_bytes)
        finally:
            child_end.close()
        self._broken = False
        parent_end.settimeout(START_TIMEOUT_SECONDS)
        try:
            reply = parent_end.recv(65536)
        except (TimeoutError, OSError) as exc:
            self.close()
            raise WorkerStartError(f"the fork server did not start: {exc}") from exc
        if reply[:1] != wire.SERVER_READY:
            self.close()
            detail = reply[1:].decode("utf-8", "replace") if reply else "it exited at start"
            raise WorkerStartError(f"the fork server could not load the graph: {detail}")

    @property
    def pid(self) -> int:
        """Process id of the fork server."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """False once the fork server has exited, or a request to it was interrupted."""
        return not self._broken and self._process.poll() is None

    def _request(self, message: bytes, fds: list[int] | None = None) -> bytes:
        """One request and its reply. Anything that interrupts the pair (Ctrl-C,
        a timeout) would leave a reply queued for the next request, so it
        retires this fork server for good."""
        with self._lock:
            if self._broken:
                raise OSError("the fork server was retired after an interrupted request")
            try:
                if fds:
                    socket.send_fds(self._control, [message], fds)
                else:
                    self._control.send(message)
                return self._control.recv(64)
            except BaseException:
                self._broken = True
                raise

    def start_worker(self, *, once: bool) -> WorkerProcess:
        """Fork a worker that already holds the graph; ``once``: it exits after one branch."""
        ours, theirs = socket.socketpair()
        try:
            reply = self._request(wire.fork_request(once=once), [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise WorkerStartError(f"the fork server is gone: {exc}") from exc
        finally:
            theirs.close()
        pid = wire.parse_forked(reply)
        if pid is None:
            ours.close()
            raise WorkerStartError("the fork server is gone")
        return WorkerProcess(pid, Connection(ours.detach()), self)

    def reap(self, worker: WorkerProcess) -> str:
        """Have the fork server wait for ``worker`` and describe how it ended."""
        try:
            reply = self._request(wire.reap_request(worker.pid))
        except OSError:
            return "ended (its exit status is unknown: the fork server is gone)"
        status = wire.parse_reaped(reply)
        if status is None:
            return "ended (its exit status is unknown: the fork server is gone)"
        return describe_wait_status(status)

    def close(self) -> None:
        """Stop the fork server; it ends any worker still running and exits."""
        self._control.close()
        _stop(self._process)


class Spawner:
    """Starts every worker as a fresh interpreter (``start_method="spawn"``)."""

    method = "spawn"

    alive = True

    def __init__(self, graph_bytes: bytes) -> None:
        self._graph_bytes = graph_bytes

    def start_worker(self, *, once: bool) -> WorkerProcess:
        """Start an interpreter, load the graph in it, and wait until it is ready."""
        ours, theirs = socket.socketpair()
        try:
            process = _start_child(["worker", str(theirs.fileno()), "1" if once else "0"],
                                   theirs.fileno(), self._graph_bytes)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        worker = WorkerProcess(process.pid, conn, self, popen=process)
        try:
            if not conn.poll(START_TIMEOUT_SECONDS):
                raise WorkerStartError("a worker process did not start in time")
            reply = wire.decode(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            worker.kill()
            raise WorkerStartError(f"a worker process {worker.reap()} at start") from exc
        except BaseException:  # also Ctrl-C: no half-started worker is left behind
            worker.kill()
            worker.reap()
            raise
        if reply[0] != Kind.READY:
            worker.reap()
            raise WorkerStartError(f"a worker process could not load the graph: {reply[1]}")
        return worker

    @staticmethod
    def reap(worker: WorkerProcess) -> str:
        """Wait for a spawned worker and describe how it ended."""
        assert worker.popen is not None
        try:
            code = worker.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            worker.popen.kill()  # it did not exit after its connection closed
            code = worker.popen.wait()
        return describe_signal(-code) if code < 0 else f"exited with code {code}"

    def close(self) -> None:
        """Nothing outlives the workers themselves."""


def _stop(process: subprocess.Popen) -> None:
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_launcher(method: str, graph_bytes: bytes) -> ForkServer | Spawner:
    """The launcher for ``method`` (one of ``START_METHODS``)."""
    if method == "forkserver":
        return ForkServer(graph_bytes)
    return Spawner(graph_bytes)
