"""Isolation backends: where the branches of a fan-out run.

What a backend author needs is public here: ``IsolationBackend`` (the
protocol), ``BranchTask`` (what a backend is handed), ``run_branch`` (the
code that runs one, the same on every backend) and the registry.
"""

from ..branch import BranchTask
from ..branch_run import run_branch
from .base import (
    IsolationBackend,
    available_backends,
    create_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["BranchTask", "IsolationBackend", "available_backends", "create_backend",
           "register_backend", "run_branch", "unregister_backend"]
