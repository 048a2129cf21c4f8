"""A compiled graph as a file's bytes in the format asked for, and writing them.

Mermaid and DOT text come from ``drawing.py``; SVG and PNG are that DOT
rendered by Graphviz's ``dot`` program, run with a timeout. When ``dot``
is missing, fails or hangs, ``GraphvizError`` says so and what to install.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from .drawing import DrawableGraph, draw_dot, draw_mermaid
from .errors import ConfigError, GraphvizError

# Generous for a workflow's graph (dot lays out hundreds of nodes in a second);
# only a broken or stuck dot reaches it.
DOT_TIMEOUT_SECONDS = 60.0
GRAPHVIZ_INSTALL = ("install the package graphviz (Debian, Ubuntu: apt-get install "
                    "graphviz; Fedora: dnf install graphviz; macOS: brew install graphviz)")


class PictureFormat(enum.Enum):
    """The formats a graph is drawn in."""

    MERMAID = "mermaid"
    DOT = "dot"
    SVG = "svg"
    PNG = "png"

    @property
    def is_text(self) -> bool:
        """True for the formats that are lines of text (Mermaid, DOT)."""
        return self in (PictureFormat.MERMAID, PictureFormat.DOT)

    @property
    def is_binary(self) -> bool:
        """True for the formats a terminal cannot show (PNG)."""
        return self is PictureFormat.PNG


def picture(graph: DrawableGraph, fmt: PictureFormat, *,
            timeout: float = DOT_TIMEOUT_SECONDS) -> bytes:
    """``graph`` drawn in ``fmt``, as the bytes of a file (text is UTF-8 with a final newline).

    SVG and PNG raise ``GraphvizError`` when ``dot`` is missing, fails or
    runs longer than ``timeout`` seconds.
    """
    if fmt is PictureFormat.MERMAID:
        return (draw_mermaid(graph) + "\n").encode("utf-8")
    if fmt is PictureFormat.DOT:
        return (draw_dot(graph) + "\n").encode("utf-8")
    return render_dot(draw_dot(graph), fmt, timeout=timeout)


def render_dot(dot_source: str, fmt: PictureFormat, *,
               timeout: float = DOT_TIMEOUT_SECONDS) -> bytes:
    """``dot_source`` rendered to ``fmt`` (SVG or PNG) by Graphviz's ``dot`` on the PATH."""
    if fmt.is_text:
        raise ConfigError(f"{fmt.value} is text, not rendered by dot")
    program = shutil.which("dot")
    if program is None:
        raise GraphvizError(f"drawing {fmt.value} needs the 'dot' program of Graphviz, which "
                            f"is not on the PATH: {GRAPHVIZ_INSTALL}, or draw as mermaid or "
                            f"dot text")
    try:
        completed = subprocess.run([program, f"-T{fmt.value}"], input=dot_source.encode("utf-8"),
                                   capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped dot by now
        raise GraphvizError(f"Graphviz's dot ({program}) did not finish drawing {fmt.value} "
                            f"within {timeout:g} s") from exc
    except OSError as exc:
        raise GraphvizError(f"Graphviz's dot ({program}) could not be started: {exc}") from exc
    if completed.returncode != 0 or not completed.stdout:
        said = " ".join(completed.stderr.decode("utf-8", "replace").split()) or "nothing"
        raise GraphvizError(f"Graphviz's dot ({program}) failed drawing {fmt.value} (exit code "
                            f"{completed.returncode}); it said: {said}")
    return completed.stdout


def write_picture(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    # Created like any new file (the umask applies, unlike mkstemp's 0600), never over
    # another's (O_EXCL), beside the target so the rename is atomic.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
