"""Durable runs: recording runs in SQLite so a killed or failed run can be resumed."""

from ..errors import GraphChangedError, RunExistsError
from .store import RunInfo, RunStatus, SqliteCheckpointer

__all__ = ["GraphChangedError", "RunExistsError", "RunInfo", "RunStatus", "SqliteCheckpointer"]
