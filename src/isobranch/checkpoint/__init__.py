"""Durable runs: recording runs in SQLite so a killed or failed run can be resumed."""

from .runs import GraphChangedError
from .store import RunExistsError, RunInfo, RunStatus, SqliteCheckpointer

__all__ = ["GraphChangedError", "RunExistsError", "RunInfo", "RunStatus", "SqliteCheckpointer"]
