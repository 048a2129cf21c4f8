"""Exceptions raised by the engine for invalid graphs and failed runs."""

from __future__ import annotations

from typing import Any


class GraphError(Exception):
    """A graph or YAML document is invalid.

    ``problems`` lists every problem found, each already naming its location
    (file, node or edge); the message joins them.
    """

    def __init__(self, message: str | None = None, *, problems: list[str] | None = None,
                 source: str | None = None) -> None:
        self.problems = list(problems) if problems else ([message] if message else [])
        self.source = source
        text = message if message is not None else "; ".join(self.problems)
        if source and not text.startswith(source):
            text = f"{source}: {text}"
        super().__init__(text)


class GraphExecutionError(Exception):
    """A node failed while the graph ran.

    Attributes name where it happened: ``node``, ``branch`` (None on the main
    path), ``error_type`` (the class name of the original exception),
    ``state`` (the state as of the failure), ``traceback`` (the failing
    code's traceback as text, also when it ran in another process),
    ``error_bases`` (the base class names of that exception, nearest first),
    ``attempts`` (how often the failing node ran), for a failed fan-out,
    ``results`` (every branch's ``ParallelFlowResult``), and for a
    checkpointed run its ``run_id`` (to resume it).
    """

    def __init__(self, message: str, *, node: str | None = None, branch: str | None = None,
                 error_type: str | None = None, state: dict | None = None,
                 results: list[Any] | None = None, timed_out: bool = False,
                 traceback: str | None = None, error_bases: tuple[str, ...] = (),
                 attempts: int = 1, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.node = node
        self.branch = branch
        self.error_type = error_type
        self.state = state
        self.results = results
        self.timed_out = timed_out
        self.traceback = traceback
        self.error_bases = error_bases
        self.attempts = attempts

    def __reduce__(self):  # keep the keyword attributes across pickling
        return (_rebuild_execution_error, (self.args[0], self.__dict__))


def _rebuild_execution_error(message: str, attrs: dict) -> GraphExecutionError:
    error = GraphExecutionError(message)
    error.traceback = None  # errors pickled before these attributes existed
    error.error_bases, error.attempts, error.run_id = (), 1, None
    error.__dict__.update(attrs)
    return error
