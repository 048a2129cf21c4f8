"""The local Dask cluster isobranch starts admits only isobranch's own client.

Every connection in it is TLS with a certificate made for that cluster, and
each end must present it: a plain client, a client speaking TCP to the same
port, and a client with a certificate of its own are all refused.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import HAVE_DASK, fan_out

pytestmark = [
    pytest.mark.skipif(not HAVE_DASK, reason="the dask extra is not installed: "
                       "pip install -e '.[test,dask]'"),
    pytest.mark.usefixtures("no_process_leak"),
]
# A refused client fails at once; a client that hangs instead fails the test here.
ATTEMPT_SECONDS = 30


_ATTEMPT = """
import sys
from distributed import Client
from distributed.security import Security

address, own_certificate = sys.argv[1], sys.argv[2] == "own-certificate"
try:
    client = Client(address, timeout=5, set_as_default=False,
                    security=Security.temporary() if own_certificate else None)
except Exception as exc:
    print("refused", type(exc).__name__, exc)
else:
    client.close()
    print("connected")
"""


def connect_attempt(address: str, *, own_certificate: bool = False) -> str:
    """What ``distributed.Client(address)`` in another process said: "connected" or "refused ...".

    Another process, as a stranger on the machine would be; it also keeps
    distributed's per-process event loop of the test out of the attempt.
    """
    done = subprocess.run([sys.executable, "-c", _ATTEMPT, address,
                           "own-certificate" if own_certificate else "none"],
                          capture_output=True, text=True, timeout=ATTEMPT_SECONDS, check=False)
    lines = done.stdout.strip().splitlines()
    assert lines, f"Client({address!r}) neither connected nor failed: {done.stderr[-2000:]}"
    return lines[-1]


def test_the_local_cluster_admits_only_isobranch_s_own_client():
    graph = fan_out(("work", lambda state: {"done": True}))
    with graph.compile(isolation="dask", max_workers=1) as app:
        (result,) = app.invoke({})["results"]
        assert result.success and result.state["done"]  # isobranch's own client works
        connection = next(iter(app._backends.values()))._connection
        address = connection.address
        assert address.startswith("tls://127.0.0.1:")
        workers = connection.client.scheduler_info()["workers"]
        assert workers and all(worker.startswith("tls://") and info["nanny"].startswith("tls://")
                               for worker, info in workers.items()), workers
        plain_tcp = "tcp://" + address.removeprefix("tls://")
        for attempt, own_certificate in ((address, False), (plain_tcp, False), (address, True)):
            outcome = connect_attempt(attempt, own_certificate=own_certificate)
            assert outcome.startswith("refused"), (
                f"{attempt} (own certificate: {own_certificate}): {outcome}")
        (again,) = app.invoke({})["results"]
        assert again.success, "refused strangers do not disturb the cluster"


def test_a_cluster_given_by_address_uses_the_tls_settings_of_the_dask_configuration():
    import logging

    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    credentials = Security.temporary()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      scheduler_port=0, dashboard_address="127.0.0.1:0", security=credentials,
                      silence_logs=logging.CRITICAL) as secured:
        assert secured.scheduler_address.startswith("tls://")
        # The settings a user would put in ~/.config/dask/*.yaml (file paths there;
        # distributed takes the PEM text itself as well).
        settings = {"distributed.comm.require-encryption": True,
                    "distributed.comm.tls.ca-file": credentials.tls_ca_file,
                    "distributed.comm.tls.client.cert": credentials.tls_client_cert,
                    "distributed.comm.tls.client.key": credentials.tls_client_key}
        graph = fan_out(("work", lambda state: {"done": True}))
        with dask.config.set(settings), graph.compile(
                isolation="dask", dask_address=secured.scheduler_address) as app:
            (result,) = app.invoke({})["results"]
        assert result.success and result.worker.startswith("tls://")


def test_without_cryptography_the_local_cluster_is_not_started_and_the_error_says_why(
        monkeypatch):
    from distributed.security import Security

    from isobranch import GraphExecutionError

    def missing(cls, **kwargs):
        raise ImportError("Using `Security.temporary` requires `cryptography`")

    monkeypatch.setattr(Security, "temporary", classmethod(missing))
    graph = fan_out(("work", lambda state: {"done": True}))
    with graph.compile(isolation="dask", max_workers=1) as app, \
            pytest.raises(GraphExecutionError, match=r"cryptography.*'dask' extra"):
        app.invoke({})
