"""Shared fixtures: the backends every engine test is parametrized over."""

from __future__ import annotations

import threading

import pytest

from isobranch import YAMLEngine, available_backends

# Every built-in backend that exists; later backends join this list.
BACKENDS = [name for name in ("inline", "thread") if name in available_backends()]


@pytest.fixture(params=BACKENDS)
def isolation(request: pytest.FixtureRequest) -> str:
    """Name of the isolation backend under test."""
    return request.param


@pytest.fixture
def load(isolation: str):
    """Compile a YAML document (dict or text) on the backend under test; closed afterwards."""
    import yaml

    graphs = []

    def _load(document, **options):
        if isinstance(document, str):
            document = yaml.safe_load(document)
        graph = YAMLEngine(isolation=isolation, **options).load_from_dict(document)
        graphs.append(graph)
        return graph

    yield _load
    for graph in graphs:
        graph.close()


@pytest.fixture
def no_thread_leak():
    """Fail if the test leaves more threads running than it found."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"
