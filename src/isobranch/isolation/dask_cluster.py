"""Where Dask branches run: a client for a given cluster, or a local one.

Kept apart from the backend so the backend only deals with tasks and
results. ``distributed`` is imported here, lazily: the package works without
the ``dask`` extra until ``isolation="dask"`` is actually used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import DaskUnavailable
from .interrupts import sigint_blocked

DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass
class Connection:
    """A client and, when isobranch started it, the local cluster behind it."""

    client: Any
    # The scheduler's address, for messages (kept: a closed client forgets it).
    address: str
    cluster: Any = None
    owns_client: bool = True

    @property
    def usable(self) -> bool:
        """Whether the client can still take work (it may reconnect, but is not closed)."""
        return self.client.status not in ("closing", "closed")

    def close(self) -> None:
        """Close what isobranch opened; a client the user passed in stays open."""
        if self.owns_client:
            try:
                self.client.close()
            finally:
                if self.cluster is not None:
                    self.cluster.close()

# How to get what the dask backend needs (isobranch is installed from a checkout).
INSTALL_HINT = ("(the 'dask' extra: pip install '.[dask]' in the isobranch checkout, "
                "or pip install distributed cryptography)")


def import_distributed() -> Any:
    """The ``distributed`` module, or a ``DaskUnavailable`` saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise DaskUnavailable("isolation 'dask' needs Dask's distributed package "
                              f"{INSTALL_HINT}") from exc
    return distributed


def connect(address: str, timeout: float) -> Connection:
    """A client for the scheduler at ``address``; unreachable is an error within ``timeout``.

    A scheduler that accepts the connection but never answers (stopped,
    overloaded, or not a scheduler at all) counts as unreachable too: the
    client's own handshake would wait for it forever.
    """
    distributed = import_distributed()
    problem = _probe(address, timeout)
    if problem is not None:
        raise DaskUnavailable(f"cannot reach the Dask scheduler at {address} within "
                              f"{timeout:g}s: {problem}")
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DaskUnavailable(f"cannot reach the Dask scheduler at {address} within "
                              f"{timeout:g}s: {exc}") from exc
    return Connection(client, address)


def _probe(address: str, timeout: float) -> str | None:
    """Why the scheduler at ``address`` does not answer within ``timeout`` (None: it does).

    Runs on a thread of its own so it works under a caller's running event
    loop (a notebook, say); the thread ends by the timeout whatever happens.
    It presents the TLS credentials of the Dask configuration, as the
    client does (``distributed.comm.tls.*``).
    """
    from distributed.core import rpc
    from distributed.security import Security

    outcome: list[str | None] = ["no answer"]

    async def ask() -> None:
        scheduler = rpc(address, timeout=timeout,
                        connection_args=Security().get_connection_args("client"))
        try:
            await asyncio.wait_for(scheduler.identity(n_workers=0), timeout)
            outcome[0] = None
        except TimeoutError:
            outcome[0] = "it accepted the connection but did not answer"
        except (OSError, ValueError, TypeError) as exc:
            outcome[0] = f"{type(exc).__name__}: {exc}"
        finally:
            await scheduler.close_rpc()

    def run() -> None:
        try:
            asyncio.run(ask())
        except Exception as exc:  # reported, never raised on a helper thread
            outcome[0] = f"{type(exc).__name__}: {exc}"

    prober = threading.Thread(target=run, name="isobranch-dask-probe", daemon=True)
    prober.start()
    prober.join(timeout + 1.0)
    return outcome[0]


def borrow(client: Any) -> Connection:
    """Use a ``distributed.Client`` the caller owns (it is not closed with the graph)."""
    import_distributed()
    if client.status in ("closing", "closed"):
        raise DaskUnavailable("the distributed.Client passed in is closed")
    return Connection(client, str(client.scheduler.address), owns_client=False)


def _main_guard_hint() -> str:
    """Advice for a script whose top level would be re-run by every spawned worker."""
    # Spawned workers re-import a script run as __main__ (not ``python -m pkg``).
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if not path or (spec and spec.name.endswith(".__main__")) or _has_main_guard(path):
        return ""
    return (" (Dask starts local workers with multiprocessing spawn, which re-runs "
            f"{path}: guard its entry point with `if __name__ == \"__main__\":`)")


def _has_main_guard(path: str) -> bool:
    """Whether the script at ``path`` has a top-level ``if __name__ == "__main__":``."""
    import ast
    from pathlib import Path

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False  # cannot tell: the hint may help
    for statement in tree.body:
        test = statement.test if isinstance(statement, ast.If) else None
        if isinstance(test, ast.Compare) and len(test.ops) == 1 \
                and isinstance(test.ops[0], ast.Eq):
            sides = [test.left, *test.comparators]
            if any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
                    isinstance(x, ast.Constant) and x.value == "__main__" for x in sides):
                return True
    return False


def _refuse_in_bootstrapping_worker() -> None:
    """Exit quietly if this process is a worker re-running the parent's script.

    A script without an ``if __name__ == "__main__":`` guard starts a cluster
    again in every spawned worker while it re-imports the script. Without
    this, each worker prints a long traceback of its own; the parent, which
    sees its workers fail, explains what to do in one message.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(1)


def start_local_cluster(n_workers: int | None, timeout: float,
                        memory_limit: int | None = None) -> Connection:
    """A ``LocalCluster`` of single-threaded worker processes on 127.0.0.1.

    Every connection to it (client, scheduler, nannies, workers) is TLS with
    a key and self-signed certificate made for this cluster and held only in
    memory, and each end must present that certificate: another local user
    or process that finds its port cannot submit work. Its HTTP server
    serves no routes (a dashboard would be unauthenticated).

    Its scheduler does not re-run a task whose worker died
    (``allowed-failures: 0``): the backend reports that branch as failed and
    retries only when asked. ``memory_limit`` (bytes) caps each worker
    process's resident memory: its nanny restarts a worker that passes it.
    The workers start with SIGINT blocked (see ``interrupts``): Ctrl-C is
    the caller's, and one arriving while the cluster starts takes effect
    once it has started, so no half-started cluster is left to tear down.
    """
    _refuse_in_bootstrapping_worker()
    distributed = import_distributed()
    import dask

    workers = n_workers or os.cpu_count() or 1
    security = _temporary_credentials()
    config: dict[str, Any] = {
        # A scheduler that re-runs nothing by itself (the backend decides), and
        # sends every task to a worker at once: queueing them on the scheduler
        # would cost a round trip per branch, and a branch queued on a worker
        # that dies is told apart from one that ran there by its confirmed start.
        "distributed.scheduler.allowed-failures": 0,
        "distributed.scheduler.worker-saturation": float("inf"),
        "distributed.scheduler.http.routes": [],
        "distributed.worker.http.routes": [],
    }
    limits: dict[str, Any] = {}
    if memory_limit is not None:
        # The limit means what it says: no spilling to disk or pausing on the
        # way (a paused worker would stall its queued branches); the nanny
        # restarts the worker once its memory passes the limit itself.
        config.update({"distributed.worker.memory.target": False,
                       "distributed.worker.memory.spill": False,
                       "distributed.worker.memory.pause": False,
                       "distributed.worker.memory.terminate": 1.0})
        limits["memory_limit"] = memory_limit
    # Starting multiprocessing's resource tracker unblocks SIGINT in the thread
    # that starts it (the cluster's event loop, from which workers are
    # started); started here first, it is already running then.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    with sigint_blocked():
        try:
            with dask.config.set(config):
                cluster = distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    scheduler_port=0, dashboard_address="127.0.0.1:0",
                    scheduler_kwargs={"dashboard": False}, security=security,
                    silence_logs=logging.CRITICAL, **limits)
        except Exception as exc:
            hint = _main_guard_hint()
            message = (f"could not start a local Dask cluster of {workers} worker(s): "
                       f"{type(exc).__name__}: {exc}{hint}")
            if hint:  # Dask's own chain of nanny errors says nothing more
                raise DaskUnavailable(message) from None
            raise DaskUnavailable(message) from exc
        try:
            client = distributed.Client(cluster, timeout=timeout, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
    return Connection(client, cluster.scheduler_address, cluster)


def _temporary_credentials() -> Any:
    """A ``Security`` with a fresh in-memory key and certificate, required on every connection."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:
        raise DaskUnavailable("the local Dask cluster is secured with temporary TLS "
                              "credentials, which need the cryptography package "
                              f"{INSTALL_HINT}") from exc
