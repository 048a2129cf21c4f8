"""Isolation backends: where the branches of a fan-out run.

What a backend author needs is public here: the base class
``IsolationBackend`` and its half of one fan-out, ``BackendFanOut``; the
branch data ``BranchTask`` and ``BranchRun`` (one attempt of a branch, as
the fan-out driver hands it out); ``run_branch``, the branch code every
backend runs; and the registry functions.

This package is the backend author's facade, above the step loop, while its
modules sit below it (the built-in backends run a branch through the graph
they are handed, ``BranchGraph.run_branch``). Importing any of them runs
this file first, so ``run_branch``, which imports the step loop, is loaded
when it is first asked for (PEP 562), never while a module below the step
loop is being imported.
"""

from typing import Any

from ..branch import BranchRun, BranchTask
from .base import BackendFanOut, IsolationBackend
from .registry import (
    available_backends,
    create_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["BackendFanOut", "BranchRun", "BranchTask", "IsolationBackend", "available_backends",
           "create_backend", "register_backend", "run_branch", "unregister_backend"]


def __getattr__(name: str) -> Any:
    if name == "run_branch":
        from ..branch_run import run_branch

        return run_branch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
