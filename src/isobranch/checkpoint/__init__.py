"""Durable runs: recording runs in SQLite so a killed or failed run can be resumed."""

from .store import RunInfo, RunStatus, SqliteCheckpointer

__all__ = ["RunInfo", "RunStatus", "SqliteCheckpointer"]
