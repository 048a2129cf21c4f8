"""Isolation backends: where the branches of a fan-out run."""

from .base import (
    IsolationBackend,
    available_backends,
    create_backend,
    register_backend,
    unregister_backend,
)

__all__ = ["IsolationBackend", "available_backends", "create_backend", "register_backend",
           "unregister_backend"]
