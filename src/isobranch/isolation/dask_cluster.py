"""Where Dask branches run: a client for a given cluster, or a local one.

Kept apart from the backend so the backend only deals with tasks and
results. ``distributed`` is imported here, lazily: the package works without
the ``dask`` extra until ``isolation="dask"`` is actually used.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

DEFAULT_CONNECT_TIMEOUT = 5.0


class DaskUnavailable(RuntimeError):
    """The Dask cluster cannot be used: extra missing, scheduler unreachable, start failed."""


@dataclass
class Connection:
    """A client and, when isobranch started it, the local cluster behind it."""

    client: Any
    cluster: Any = None
    owns_client: bool = True

    @property
    def address(self) -> str:
        """The scheduler's address, for messages."""
        return str(self.client.scheduler.address)

    def close(self) -> None:
        """Close what isobranch opened; a client the user passed in stays open."""
        if self.owns_client:
            try:
                self.client.close()
            finally:
                if self.cluster is not None:
                    self.cluster.close()


def import_distributed() -> Any:
    """The ``distributed`` module, or a ``DaskUnavailable`` saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise DaskUnavailable("isolation 'dask' needs Dask's distributed package: "
                              "pip install 'isobranch[dask]'") from exc
    return distributed


def connect(address: str, timeout: float) -> Connection:
    """A client for the scheduler at ``address``; unreachable is an error within ``timeout``."""
    distributed = import_distributed()
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DaskUnavailable(f"cannot reach the Dask scheduler at {address} within "
                              f"{timeout:g}s: {exc}") from exc
    except ValueError as exc:  # a malformed address
        raise DaskUnavailable(f"bad Dask scheduler address {address!r}: {exc}") from exc
    return Connection(client)


def borrow(client: Any) -> Connection:
    """Use a ``distributed.Client`` the caller owns (it is not closed with the graph)."""
    import_distributed()
    return Connection(client, owns_client=False)


def _main_guard_hint() -> str:
    # Spawned workers re-import a script run as __main__ (not ``python -m pkg``).
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(main, "__file__", None) and not (spec and spec.name.endswith(".__main__")):
        return (" (Dask starts local workers with multiprocessing spawn, which re-runs "
                f"{main.__file__}: guard its entry point with `if __name__ == \"__main__\":`)")
    return ""


def start_local_cluster(n_workers: int | None, timeout: float) -> Connection:
    """A ``LocalCluster`` of single-threaded worker processes on 127.0.0.1.

    Its scheduler does not re-run a task whose worker died
    (``allowed-failures: 0``): the backend reports that branch as failed and
    retries only when asked.
    """
    distributed = import_distributed()
    import dask

    workers = n_workers or os.cpu_count() or 1
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                scheduler_port=0, dashboard_address="127.0.0.1:0",
                silence_logs=logging.CRITICAL)
    except Exception as exc:
        raise DaskUnavailable(f"could not start a local Dask cluster of {workers} worker(s): "
                              f"{type(exc).__name__}: {exc}{_main_guard_hint()}") from exc
    try:
        client = distributed.Client(cluster, timeout=timeout, set_as_default=False)
    except Exception:
        cluster.close()
        raise
    return Connection(client, cluster)

