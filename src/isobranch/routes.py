"""Where the step loop goes after a node: ``START``, ``END`` and ``Routes``.

Written once here, below everything that reads them (the graph builder, the
compiled graph, the step loop, drawing), so none of those imports another
for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .conditions import Condition

START = "__start__"
END = "__end__"


@dataclass
class Routes:
    """Where to go after a node: a router, conditional edges, a default edge."""

    router: Callable[[dict], Any] | None = None
    mapping: dict[Any, str] | None = None
    conditional: list[tuple[Condition, str]] = field(default_factory=list)
    default: str | None = None
