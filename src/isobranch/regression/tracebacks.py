"""Tracebacks in reports: the agent's own frames, without the engine's, from wherever the code ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import GraphExecutionError
from .text import bounded

# Tracebacks one report shows (the error's own, then failed branches'), the
# last lines kept of each, and the characters kept of each line.
MAX_TRACEBACKS = 3
MAX_TRACEBACK_LINES = 15
MAX_TRACEBACK_LINE_CHARS = 200

# Frames in files under the isobranch package are the engine's, not the agent's.
ENGINE_DIR = str(Path(__file__).resolve().parents[1])


def user_frames(text: str) -> list[str]:
    """A traceback's lines without its header and the engine's own frames: the agent's code."""
    lines = text.rstrip().splitlines()
    kept: list[str] = []
    skipping = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("Traceback (most recent call last)"):
            continue
        if stripped.startswith('File "'):
            skipping = ENGINE_DIR in stripped
            if skipping:
                continue
        elif skipping and line.startswith("    "):
            continue  # the source lines and carets of a skipped frame
        else:
            skipping = False
        kept.append(line)
    return kept


def traceback_lines(error: GraphExecutionError, failed: list[Any]) -> list[str]:
    """The failing code's traceback (from whichever process ran it), then failed branches'."""
    shown: list[tuple[str, str]] = []
    own = getattr(error, "traceback", None)
    if own:
        shown.append((f"traceback ({error.branch or 'main path'})", own))
    for result in failed:
        if len(shown) >= MAX_TRACEBACKS:
            break
        if result.traceback and result.traceback != own:
            shown.append((f"traceback of branch {result.branch!r}", result.traceback))
    lines = []
    for title, text in shown:
        body = user_frames(text)
        if len(body) > MAX_TRACEBACK_LINES:
            body = ["  ...", *body[-MAX_TRACEBACK_LINES:]]
        lines.append(f"{title}:")
        lines += [f"  {bounded(line, MAX_TRACEBACK_LINE_CHARS)}" for line in body]
    return lines
