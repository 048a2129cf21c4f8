"""Imports go one way: the modules below never import the ones above them.

Every import counts, a function-local one or one under ``TYPE_CHECKING``
too: a module that needs something of its owner is handed the data instead.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

import isobranch

PACKAGE = Path(isobranch.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every isobranch module ``path`` imports, wherever the import statement is."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # a name that is a submodule imports the submodule
                submodule = f"{base}.{alias.name}"
                found.add(submodule if _is_module(submodule) else base)
    return {name for name in found if name.startswith("isobranch") and _is_module(name)}


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for imported in graph.get(todo.pop(), ()):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def test_the_import_scanner_sees_local_and_type_checking_imports():
    # runner.py imports RunRecorder and IsolationBackend under TYPE_CHECKING only.
    assert {"isobranch.checkpoint.recorder", "isobranch.isolation.base", "isobranch.fanout",
            "isobranch.fanout_run"} <= _imports(PACKAGE / "runner.py")
    # The backends' facade imports run_branch inside a function.
    assert "isobranch.branch_run" in _imports(PACKAGE / "isolation" / "__init__.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing
    itself), sorted: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.get(module, ()):
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_no_import_cycle_of_any_kind():
    """No module reaches itself through imports, counting function-local and
    ``TYPE_CHECKING`` ones (``lint-imports`` checks the layers in CI as well)."""
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle_through_a_type_checking_import():
    graph = _graph()
    # What context.py imported before it was handed the graph as a BranchGraph.
    graph["isobranch.context"] = graph["isobranch.context"] | {"isobranch.compiled"}
    cycle = next(c for c in _cycles(graph) if "isobranch.context" in c)
    assert {"isobranch.compiled", "isobranch.runner", "isobranch.context"} <= set(cycle)


@pytest.mark.parametrize("module", ["isobranch.yaml_engine", "isobranch.yaml_builder",
                                    "isobranch.yaml_settings", "isobranch.yaml_lines",
                                    "isobranch.yaml_reading", "isobranch.yaml_subgraphs"])
def test_the_yaml_modules_form_no_cycle(module):
    graph = _graph()
    assert module not in _reachable(graph, module)


@pytest.mark.parametrize("module, above", [
    ("isobranch.yaml_settings", {"isobranch.yaml_engine", "isobranch.yaml_builder"}),
    ("isobranch.yaml_builder", {"isobranch.yaml_engine"}),
    ("isobranch.yaml_subgraphs", {"isobranch.yaml_engine", "isobranch.yaml_builder"}),
    ("isobranch.yaml_reading", {"isobranch.yaml_engine", "isobranch.yaml_builder"}),
    ("isobranch.run", {"isobranch.compiled", "isobranch.graph"}),
    ("isobranch.async_api", {"isobranch.compiled"}),
    ("isobranch.checkpoint.runs", {"isobranch.compiled", "isobranch.run"}),
    ("isobranch.checkpoint.fingerprint", {"isobranch.compiled", "isobranch.run"}),
    # The step loop is handed a recorder; the database is not its business.
    ("isobranch.runner", {"isobranch.checkpoint.store"}),
    # The fan-out driver is handed its backend and observers; planning runs nothing.
    ("isobranch.fanout_run", {"isobranch.runner", "isobranch.checkpoint",
                              "isobranch.checkpoint.store", "isobranch.checkpoint.recorder"}),
    ("isobranch.fanout", {"isobranch.fanout_run", "isobranch.runner", "isobranch.isolation",
                          "isobranch.isolation.base", "isobranch.isolation.registry"}),
])
def test_a_module_never_imports_the_modules_above_it(module, above):
    assert not _imports(PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")) & above


def _layered_modules() -> list[set[str]]:
    """The modules of each layer of the layers contract in pyproject.toml, top first."""
    config = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c["type"] == "layers")
    return [{name.strip() for name in layer.replace(":", "|").split("|")}
            for layer in contract["layers"]]


def test_every_module_has_a_place_in_the_import_layers():
    """A new module must be placed in a layer (lint-imports leaves an unlisted one
    unchecked); only the package itself and the backends' facade are above them all."""
    layered = set().union(*_layered_modules())
    unplaced = {module for module in _graph()
                if not any(module == name or module.startswith(f"{name}.") for name in layered)}
    assert unplaced == {"isobranch", "isobranch.isolation"}


# Every module of the package: none reads another object's private names.
PRIVATE_READERS_CHECKED = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py"))


def _private_reads(path: Path) -> list[str]:
    """``x._name`` for any ``x`` but ``self``/``cls``, and ``from m import _name``."""
    reads = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls", "os")):
                reads.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            reads.extend(f"{path.name}:{node.lineno} import {alias.name}"
                         for alias in node.names if _private(alias.name))
    return reads


# A named tuple's public methods start with an underscore so they never clash with a field.
NAMED_TUPLE_METHODS = {"_replace", "_asdict", "_make", "_fields", "_field_defaults"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in NAMED_TUPLE_METHODS


@pytest.mark.parametrize("where", PRIVATE_READERS_CHECKED)
def test_these_modules_read_no_other_objects_private_names(where):
    paths = sorted((PACKAGE / where).rglob("*.py")) if (PACKAGE / where).is_dir() else [
        PACKAGE / where]
    assert not [read for path in paths for read in _private_reads(path)]
