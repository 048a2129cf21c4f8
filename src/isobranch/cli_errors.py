"""Library errors in the command's words: what to type, where the library says what to call.

A few errors tell the user how to go on. The library says it in Python
(``resume('r1')``, ``force=True``); the command line must say it in its
own options and subcommands. Those errors carry what the command needs
(run id, database, changes) as attributes, and ``command_message`` words
them; every other error is shown as the library wrote it.
"""

from __future__ import annotations

import shlex

from .errors import GraphChangedError, RunExistsError


def command_message(exc: BaseException, workflow: str, checkpoint: str | None) -> str | None:
    """The command's own message for ``exc``, or None when the library's serves.

    ``workflow`` is the YAML file as the user gave it, ``checkpoint`` the
    ``--checkpoint`` option (None: the workflow's ``settings.checkpoint``).
    """
    if isinstance(exc, RunExistsError):
        database = checkpoint if checkpoint is not None else str(exc.path)
        resume = _command("resume", workflow, exc.run_id, *_database_option(checkpoint))
        delete = _command("runs", database, "--delete", exc.run_id)
        return (f"run {exc.run_id!r} already exists in {database}; resume it ({resume}), "
                f"delete it ({delete}) or choose another --run-id")
    if isinstance(exc, GraphChangedError):
        database = checkpoint if checkpoint is not None else str(exc.path)
        return (f"run {exc.run_id!r} in {database}: the workflow changed since the run started "
                f"({'; '.join(exc.changes)}); add --force to resume it with the changed "
                f"workflow anyway")
    return None


def _database_option(checkpoint: str | None) -> tuple[str, ...]:
    return ("--checkpoint", checkpoint) if checkpoint is not None else ()


def _command(*words: str) -> str:
    return " ".join(["isobranch", *(shlex.quote(word) for word in words)])
