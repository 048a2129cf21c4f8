"""The command's log records on stderr: ``-v`` for INFO, ``-vv`` for DEBUG.

The library itself installs no handler: it logs through ``logging`` under
``isobranch.*`` loggers and leaves the output to the application. The
command is such an application. While it runs, one handler on the
``isobranch`` logger writes records at the chosen level and above to
stderr — never to stdout, which carries only the command's own output
(the final state or the ``--stream`` lines). Warnings show without ``-v``.
The handler is removed, and the logger's level restored, when the command
ends, so calling ``main()`` twice in one process does not print records
twice.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

PACKAGE_LOGGER = "isobranch"
# Index: how many times -v was given (more than twice counts as twice).
LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
RECORD_FORMAT = "isobranch: %(levelname)s: %(name)s: %(message)s"


def add_verbosity_option(parser: argparse.ArgumentParser) -> None:
    """Give a subcommand ``-v/--verbose`` (counted) as ``args.verbose``."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log records on stderr: -v INFO and above, -vv DEBUG "
                             "(warnings show without it)")


def level_for(verbosity: int) -> int:
    """The lowest level shown for ``verbosity`` uses of ``-v``."""
    return LEVELS[max(0, min(verbosity, len(LEVELS) - 1))]


@contextlib.contextmanager
def log_to_stderr(verbosity: int, stream: TextIO | None = None) -> Iterator[logging.Handler]:
    """While the block runs, show the package's records at ``level_for(verbosity)`` on stderr."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(RECORD_FORMAT))
    level = level_for(verbosity)
    handler.setLevel(level)
    saved_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        with contextlib.suppress(Exception):  # a closed stderr must not hide the real outcome
            handler.flush()
