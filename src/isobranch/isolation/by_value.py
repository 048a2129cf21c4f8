"""Which of the caller's modules a pickled graph carries by value, and pickling it so.

cloudpickle pickles a function or class of an importable module *by
reference* (its module and name), so the other side must import that
module. The modules a caller writes next to a script (``myflow.py``) are
importable where the caller runs but usually not on a Dask worker; there
they travel *by value* instead: cloudpickle does that for the modules
registered with ``cloudpickle.register_pickle_by_value``.

Which modules travel by value depends on what the other side can import
(``Receiver``). The modules are found while pickling: a pickler records the
module of every function, class and module object it meets, and each
module found that the receiver cannot import is registered for one more
pickling (which may meet further modules, say a helper module the first
one imports). A module whose by-value pickling fails (a lock among the
globals its functions use) stays by reference, as do compiled extension
modules, and the reason is kept for the error a receiver that cannot
import it reports.

Registration is process-wide state of cloudpickle: it lasts one pickling,
and one graph is pickled at a time (a lock), so two graphs pickled at once
on two threads never see each other's registrations come or go. A module
the caller registered itself stays registered.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import io
import os
import pickle
import site
import sys
import sysconfig
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import cloudpickle

# The engine and what it needs (pyproject's dependencies and dask extra) are
# installed wherever a branch runs: workers import them to load the graph at
# all, and shipping the engine by value would duplicate its classes there.
ENGINE_PACKAGES = frozenset({"isobranch", "cloudpickle", "lupa", "yaml", "tqdm", "dask",
                             "distributed"})

# Held while modules are registered with cloudpickle: registration is global.
# Reentrant: pickling may run code of the graph's objects that pickles a graph too.
_REGISTRATION_LOCK = threading.RLock()


class Receiver(Enum):
    """What the side that loads a pickled graph can import by name."""

    # Worker processes started by the caller with the caller's sys.path: they
    # import whatever the caller imported from sys.path.
    CALLERS_SYS_PATH = "callers-sys-path"
    # Workers with an environment of their own (Dask): only installed packages
    # and the standard library can be counted on.
    INSTALLED_PACKAGES = "installed-packages"


@dataclass(frozen=True)
class PickledGraph:
    """A pickled graph and how it carries the caller's modules."""

    data: bytes
    # Modules whose functions and classes travel by value, in the order found.
    by_value: tuple[str, ...] = ()
    # Top-level modules the receiver must import itself, each with why it is
    # not carried by value, worded to follow the module's name: "is installed
    # where the graph was built (pip install pytest)".
    by_reference: dict[str, str] = field(default_factory=dict)


class _ModuleRecorder(cloudpickle.Pickler):
    """A cloudpickle pickler that notes the module of every function, class and module it meets."""

    def __init__(self, file: io.BytesIO, modules: set[str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._modules = modules

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            self._modules.add(obj.__name__)
        elif isinstance(obj, (types.FunctionType, type)):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self._modules.add(module)
        return super().reducer_override(obj)


def pickle_by_value(obj: Any, receiver: Receiver) -> PickledGraph:
    """``obj`` pickled with the modules ``receiver`` cannot import carried by value.

    Raises whatever pickling ``obj`` with every module by reference raises
    (the object itself cannot be pickled).
    """
    # One pickling at a time registers modules: another graph pickled meanwhile
    # would find this one's modules registered, rely on them, and lose them
    # half-way through its own pickling when this one unregisters them.
    with _REGISTRATION_LOCK:
        data, seen = _dump(obj, ())
        by_value: list[types.ModuleType] = []
        failed: dict[str, str] = {}
        while (module := _next_to_ship(seen, by_value, failed, receiver)) is not None:
            try:
                data, seen = _dump(obj, (*by_value, module))
            except Exception as exc:
                failed[module.__name__] = (f"could not travel by value "
                                           f"({type(exc).__name__}: {exc})")
            else:
                by_value.append(module)
    shipped = tuple(module.__name__ for module in by_value)
    return PickledGraph(data, shipped, _imported_by_receiver(seen, shipped, failed, receiver))


def _dump(obj: Any, modules: Iterable[types.ModuleType]) -> tuple[bytes, set[str]]:
    """``obj`` pickled with ``modules`` registered by value for this one pickling,
    and the modules the pickling met. The caller holds ``_REGISTRATION_LOCK``."""
    seen: set[str] = set()
    # A module the caller registered stays registered.
    already = set(cloudpickle.list_registry_pickle_by_value())
    registered = []
    try:
        for module in modules:
            if module.__name__ not in already:
                cloudpickle.register_pickle_by_value(module)
                registered.append(module)
        with io.BytesIO() as file:
            _ModuleRecorder(file, seen).dump(obj)
            return file.getvalue(), seen
    finally:
        for module in registered:
            cloudpickle.unregister_pickle_by_value(module)


def _next_to_ship(seen: set[str], by_value: list[types.ModuleType], failed: dict[str, str],
                  receiver: Receiver) -> types.ModuleType | None:
    """A module met while pickling that should travel by value and was not tried yet."""
    tried = {module.__name__ for module in by_value} | set(failed)
    for name in sorted(seen - tried):
        module = sys.modules.get(name)
        if module is not None and _travels_by_value(module, receiver):
            return module
    return None


def _travels_by_value(module: types.ModuleType, receiver: Receiver) -> bool:
    """Whether ``receiver`` may fail to import ``module``, and it can travel by value."""
    name = module.__name__
    if name == "__main__" or _is_engine_or_standard(name):
        return False  # cloudpickle carries __main__'s functions by value anyway
    top = sys.modules.get(_top(name), module)
    # A module without a file of its own (one a package makes) is where its package is.
    path = getattr(module, "__file__", None) or getattr(top, "__file__", None)
    if path is None:
        # A namespace package is found on a path; a module with neither a file
        # nor a path was made in memory and exists nowhere else.
        return getattr(top, "__path__", None) is None
    if path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) or _is_installed(path):
        return False  # compiled code cannot travel; installed packages are imported
    if receiver is Receiver.CALLERS_SYS_PATH:
        return not _found_on_sys_path(top)
    return True


def _top(name: str) -> str:
    return name.partition(".")[0]


def _is_engine_or_standard(name: str) -> bool:
    top = _top(name)
    return (top in ENGINE_PACKAGES or top in sys.stdlib_module_names
            or top in sys.builtin_module_names)


@functools.cache
def _install_roots() -> tuple[str, ...]:
    """Where this interpreter's standard library and installed packages live."""
    paths = sysconfig.get_paths()
    roots = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    roots += site.getsitepackages()
    roots.append(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots if root)


def _is_installed(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    return ("site-packages" in parts or "dist-packages" in parts
            or real.startswith(_install_roots()))


def _found_on_sys_path(top_module: types.ModuleType) -> bool:
    """Whether an interpreter with this ``sys.path`` imports ``top_module`` from the same place."""
    spec = importlib.machinery.PathFinder.find_spec(top_module.__name__, sys.path)
    if spec is None:
        return False
    here = getattr(top_module, "__file__", None)
    if spec.origin is not None and here is not None:
        return os.path.realpath(spec.origin) == os.path.realpath(here)
    return list(spec.submodule_search_locations or []) == list(getattr(top_module, "__path__", []))


def _imported_by_receiver(seen: set[str], shipped: tuple[str, ...], failed: dict[str, str],
                          receiver: Receiver) -> dict[str, str]:
    """The top-level modules (not the engine's, not the standard library) the receiver
    imports to load the graph, each with why it is not carried by value."""
    reasons: dict[str, str] = {}
    distributions: dict[str, list[str]] | None = None
    for name in sorted(seen - set(shipped)):
        top = _top(name)
        path = getattr(sys.modules.get(top), "__file__", None)
        if top in reasons or name == "__main__" or _is_engine_or_standard(top):
            continue
        if name in failed:
            reasons[top] = failed[name]
        elif receiver is Receiver.INSTALLED_PACKAGES and path is not None \
                and _is_installed(path):
            if distributions is None:  # only now: reading every package's metadata takes a while
                distributions = importlib.metadata.packages_distributions()
            names = distributions.get(top)
            reasons[top] = ("is installed where the graph was built"
                            + (f" (pip install {' '.join(names)})" if names else ""))
    return reasons
