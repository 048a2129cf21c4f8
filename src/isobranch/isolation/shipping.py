"""What backends that cross a process boundary share: their error and graph pickling."""

from __future__ import annotations

from typing import Any

import cloudpickle

from ..errors import BackendError
from .by_value import PickledGraph, Receiver, pickle_by_value


def pickle_graph(graph: Any, where: str) -> bytes:
    """The compiled graph as bytes for worker processes started with the caller's ``sys.path``."""
    return ship_graph(graph, where, Receiver.CALLERS_SYS_PATH).data


def ship_graph(graph: Any, where: str, receiver: Receiver) -> PickledGraph:
    """The compiled graph pickled for ``where``; a clear error names what cannot travel.

    Python callables given to ``StateGraph`` travel by value (cloudpickle),
    and so do the functions and classes of the caller's own modules that
    ``receiver`` cannot import (see ``by_value``), so workers need not
    import the module that defined them.
    """
    try:
        return pickle_by_value(graph, receiver)
    except Exception as exc:
        for name, node in graph.nodes.items():
            try:
                cloudpickle.dumps(node)
            except Exception as node_exc:
                raise BackendError(f"node {name!r} cannot be sent to {where}: "
                                   f"{type(node_exc).__name__}: {node_exc}") from exc
        raise BackendError(f"the graph cannot be sent to {where} (an edge condition "
                           f"or router?): {type(exc).__name__}: {exc}") from exc
