"""Isolation backends: where the branches of a fan-out run.

What a backend author needs is public here: the base class
``IsolationBackend``, the branch data ``BranchTask`` and ``run_branch``
(the branch code every backend runs), and the registry functions.
"""

from ..branch import BranchTask
from ..branch_run import run_branch
from .base import IsolationBackend
from .registry import (
    available_backends,
    create_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["BranchTask", "IsolationBackend", "available_backends", "create_backend",
           "register_backend", "run_branch", "unregister_backend"]
