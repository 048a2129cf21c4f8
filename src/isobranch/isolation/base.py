"""The isolation backend protocol and the registry of backends by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import GraphError

if TYPE_CHECKING:
    from ..branch import BranchTask, ParallelFlowResult


@runtime_checkable
class IsolationBackend(Protocol):
    """Where the branches of a fan-out run.

    ``run_branches`` returns one result per task, in task order, and never
    raises for a failing branch. ``close`` releases every worker it owns.
    """

    name: str

    def run_branches(self, tasks: list[BranchTask]) -> list[ParallelFlowResult]: ...

    def close(self) -> None: ...


BackendFactory = Callable[..., IsolationBackend]

# The one global registry the project allows: backend name -> factory.
_registry: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory(max_workers=..., **options)`` available as ``isolation=name``.

    Registering a name twice is an error unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("backend name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"backend {name!r}: factory must be callable")
    if name in _registry and not replace and _registry[name] is not factory:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True)")
    _registry[name] = factory


def available_backends() -> list[str]:
    """Names accepted as ``isolation``, sorted."""
    _ensure_builtins()
    return sorted(_registry)


def backend_factory(name: str) -> BackendFactory | None:
    """The factory registered as ``name`` (None if there is none)."""
    _ensure_builtins()
    return _registry.get(name)


def create_backend(name: str, **options: Any) -> IsolationBackend:
    """Build a backend by name; unknown names and options are a ``GraphError``."""
    _ensure_builtins()
    factory = _registry.get(name)
    if factory is None:
        raise GraphError(f"unknown isolation backend {name!r}; available: "
                         f"{', '.join(sorted(_registry))}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise GraphError(f"isolation backend {name!r}: {exc}") from exc


def _ensure_builtins() -> None:
    # Imported lazily so the registry module has no import cycle with them.
    from . import dask, inline, process, thread  # noqa: F401
