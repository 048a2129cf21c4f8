"""``python -m isobranch`` is the ``isobranch`` command."""

from .cli import console

console()
