"""What backends that cross a process boundary share: their error and graph pickling."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from ..errors import BackendError


def pickle_graph(graph: Any, where: str) -> bytes:
    """The compiled graph as bytes for ``where``; a clear error names what cannot travel.

    Python callables given to ``StateGraph`` travel by value (cloudpickle),
    so workers need not import the module that defined them.
    """
    try:
        return cloudpickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        for name, node in graph.nodes.items():
            try:
                cloudpickle.dumps(node)
            except Exception as node_exc:
                raise BackendError(f"node {name!r} cannot be sent to {where}: "
                                   f"{type(node_exc).__name__}: {node_exc}") from exc
        raise BackendError(f"the graph cannot be sent to {where} (an edge condition "
                           f"or router?): {type(exc).__name__}: {exc}") from exc
