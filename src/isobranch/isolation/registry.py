"""The registry of backends by name: the built-in ones, listed lazily, and registered ones.

The built-in backends are a table of names to ``"module:Class"`` paths:
nothing is imported, let alone registered, until a backend of that name is
created or its factory is asked for. ``register_backend`` adds a
third-party factory (or replaces a built-in one); the dict it writes to is
the one global mutable registry the project allows.

A backend made by a factory that does not subclass ``IsolationBackend``
(one written to the first protocol, ``run_branches`` or ``stream_branches``)
is wrapped once, here, in the adapter that fits it (see ``adapters``).
A factory's signature declares the options its backend takes
(``backend_options``), so a registered third-party backend is checked the
same way as a built-in one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, ConfigTypeError, GraphError
from .adapters import adapt
from .base import IsolationBackend

BackendFactory = Callable[..., Any]

# The built-in backends, imported only when one is used.
BUILTIN_BACKENDS: dict[str, str] = {
    "inline": "isobranch.isolation.inline:InlineBackend",
    "thread": "isobranch.isolation.thread:ThreadBackend",
    "process": "isobranch.isolation.process.backend:ProcessBackend",
    "dask": "isobranch.isolation.dask:DaskBackend",
}

# Registered factories (third-party backends, replaced built-ins): name -> factory.
_registered: dict[str, BackendFactory] = {}

# Passed by compile() itself, never as a backend option.
_FACTORY_OWN = frozenset({"max_workers"})


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory(max_workers=..., **options)`` available as ``isolation=name``.

    Registering a name twice (a built-in one too) is an error unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("backend name must be a non-empty string")
    if not callable(factory):
        raise ConfigTypeError(f"backend {name!r}: factory must be callable")
    if not replace and name in available_backends():
        current = backend_factory(name)
        if current is not factory:
            raise ConfigError(f"backend {name!r} is already registered (pass replace=True)")
    _registered[name] = factory


def unregister_backend(name: str) -> None:
    """Forget the backend registered as ``name``, so a test's registration does not outlive it.

    Unknown and built-in names are a ``ValueError``. Graphs already compiled
    for ``name`` keep the pools they have.
    """
    if name in BUILTIN_BACKENDS:
        raise ConfigError(f"backend {name!r} is built in and cannot be unregistered "
                          f"(register_backend({name!r}, factory, replace=True) replaces it)")
    if name not in _registered:
        raise ConfigError(f"no isolation backend {name!r} is registered")
    del _registered[name]


def available_backends() -> list[str]:
    """Names accepted as ``isolation``, sorted."""
    return sorted({*BUILTIN_BACKENDS, *_registered})


def backend_factory(name: str) -> BackendFactory | None:
    """The factory of backend ``name`` (a built-in one's class is imported now); None if unknown."""
    factory = _registered.get(name)
    if factory is not None:
        return factory
    path = BUILTIN_BACKENDS.get(name)
    if path is None:
        return None
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def create_backend(name: str, **options: Any) -> IsolationBackend:
    """Build a backend by name; unknown names and options are a ``GraphError``.

    A backend of the first protocol comes back wrapped in its adapter.
    """
    factory = backend_factory(name)
    if factory is None:
        raise GraphError(f"unknown isolation backend {name!r}; available: "
                         f"{', '.join(available_backends())}")
    try:
        backend = factory(**options)
    except TypeError as exc:
        raise GraphError(f"isolation backend {name!r}: {exc}") from exc
    return backend if isinstance(backend, IsolationBackend) else adapt(backend)


def backend_options(name: str) -> frozenset[str] | None:
    """The option names backend ``name``'s factory accepts (besides ``max_workers``).

    ``None`` means any option: the factory takes ``**kwargs`` or has no
    readable signature. An unknown backend accepts none.
    """
    factory = backend_factory(name)
    if factory is None:
        return frozenset()
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    names = set()
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return frozenset(names - _FACTORY_OWN)


def every_backend_option() -> frozenset[str]:
    """The options some available backend declares."""
    return frozenset().union(*(backend_options(name) or frozenset()
                               for name in available_backends()))


def backends_accepting(option: str) -> list[str]:
    """Names of the available backends that declare ``option``."""
    return [name for name in available_backends()
            if option in (backend_options(name) or frozenset())]
