"""Isolation backends: where the branches of a fan-out run.

What a backend author needs is public here: the base class
``IsolationBackend`` and its half of one fan-out, ``BackendFanOut``; the
branch data ``BranchTask`` and ``BranchRun`` (one attempt of a branch, as
the fan-out driver hands it out); ``run_branch``, the branch code every
backend runs; and the registry functions.
"""

from ..branch import BranchRun, BranchTask
from ..branch_run import run_branch
from .base import BackendFanOut, IsolationBackend
from .registry import (
    available_backends,
    create_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["BackendFanOut", "BranchRun", "BranchTask", "IsolationBackend", "available_backends",
           "create_backend", "register_backend", "run_branch", "unregister_backend"]
