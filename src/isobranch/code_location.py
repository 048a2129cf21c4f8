"""Where YAML code sits in its file: running it with the file's line numbers, naming a failing line.

A node's ``run:`` body, a ``when:`` condition or a map's ``over:`` read
from a file carries a ``CodeLocation``: the file, and the file line its
first line is on. Python is compiled under the file's name with its lines
shifted, so a traceback shows ``File "agent.yaml", line 16``; Lua runs as a
chunk named after the file, preceded by blank lines, so its messages read
``agent.yaml:12: attempt to index a nil value``. ``python_site`` and
``lua_site`` say what the message naming a failed node or condition adds:
``at agent.yaml:16, line 2 of its code`` for Python, ``line 3 of its code``
for Lua (whose own message names the file's line already).
"""

from __future__ import annotations

import linecache
import os
import re
import threading
from dataclasses import dataclass

# Nodes of one file share its linecache entry; building them on several
# threads at once must not lose one's lines.
_LINECACHE_LOCK = threading.Lock()
# The characters of a chunk's name Lua keeps in a message (LUA_IDSIZE - 1); it cuts the rest.
LUA_CHUNK_NAME_MAX = 59


@dataclass(frozen=True)
class CodeLocation:
    """The file some code was read from, and the file line of the code's first line (1-based)."""

    file: str
    line: int

    def lua_code(self, code: str) -> str:
        """``code`` behind blank lines, so Lua numbers its lines as the file does."""
        return "\n" * (self.line - 1) + code

    @property
    def lua_chunk_name(self) -> str:
        """The file's name for Lua: as given, or its last part if Lua would cut that short."""
        return self.file if len(self.file) <= LUA_CHUNK_NAME_MAX else os.path.basename(self.file)

    def needs_code_line(self, code: str) -> bool:
        """Whether a line of ``code`` needs naming beside the file's: it has several, not the file's."""
        return self.line > 1 and line_count(code) > 1

    def line_in_code(self, file_line: int) -> str:
        """``line 2 of its code``: where the file's ``file_line`` is within the code."""
        return f"line {file_line - self.line + 1} of its code"

    def python_site(self, error: BaseException, code: str) -> str | None:
        """``at agent.yaml:16, line 2 of its code``: where Python ``code`` raised ``error``, or None.

        The innermost frame of ``error``'s traceback that runs this code (its
        file, a line within it) is the line: a call into other code points
        at the line that made the call.
        """
        first, last = self.line, self.line + line_count(code) - 1
        found = None
        frame = error.__traceback__
        while frame is not None:
            line = frame.tb_lineno
            if (frame.tb_frame.f_code.co_filename == self.file and line is not None
                    and first <= line <= last):
                found = line
            frame = frame.tb_next
        if found is None:
            return None
        site = f"at {self.file}:{found}"
        return f"{site}, {self.line_in_code(found)}" if self.needs_code_line(code) else site

    def lua_site(self, error: BaseException, code: str) -> str | None:
        """``line 3 of its code``: where Lua ``code`` raised ``error``, or None.

        Lua starts an error's message with the chunk's name and the line
        (``agent.yaml:12: ...``), unless the error is not a string or was
        raised with level 0; then there is no line to name. Code of one
        line, or a whole file of code, needs no more than Lua's message.
        """
        match = re.match(rf"{re.escape(self.lua_chunk_name)}:(\d+):", str(error))
        if match is None or not self.needs_code_line(code):
            return None
        line = int(match.group(1))
        return self.line_in_code(line) if self.line <= line < self.line + line_count(code) else None

    def remember(self, code: str) -> None:
        """Put ``code``'s lines in ``linecache`` where they are in the file, for tracebacks.

        Code compiled in another process (a worker) is shown too, though
        that process never read the file. The entry has no modification
        time, so ``linecache`` keeps it rather than rereading the file.
        """
        lines = [line if line.endswith("\n") else line + "\n"
                 for line in code.splitlines(keepends=True)]
        start = self.line - 1
        with _LINECACHE_LOCK:
            entry = linecache.cache.get(self.file)
            known = list(entry[2]) if entry is not None and len(entry) == 4 and entry[1] is None \
                else []
            known.extend(["\n"] * (start + len(lines) - len(known)))
            known[start:start + len(lines)] = lines
            linecache.cache[self.file] = (sum(map(len, known)), None, known, self.file)


def line_count(code: str) -> int:
    """How many lines ``code`` has (at least one)."""
    return len(code.splitlines()) or 1
