"""What a ``subgraph:`` node of a YAML workflow needs besides the builder: the files it includes.

``IncludeChain`` is the list of files from the document being loaded down
to the one being read: it names a problem's file (``main.yaml →
review.yaml: node 'x': ...``) and finds a file that includes itself,
directly or through others. ``subgraph_path`` resolves a node's path
against the directory of the file naming it (inside that directory for a
Lua-only document); the Lua limits an included file may lower but never raise are
``yaml_settings.LuaCeiling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .yaml_settings import contained_file

# How the chain names a document given as a mapping, which has no file name.
UNNAMED_DOCUMENT = "<document>"
CHAIN_ARROW = " → "


@dataclass(frozen=True)
class IncludedFile:
    """One file of an include chain: where it is, and its name as messages show it."""

    path: Path | None  # resolved; None for a document given as a mapping
    name: str


@dataclass(frozen=True)
class IncludeChain:
    """The files from the loaded document down to the one being read, outermost first."""

    files: tuple[IncludedFile, ...]

    @classmethod
    def top(cls, source: str | None, path: Path | None) -> IncludeChain:
        """The chain of the document the engine was asked to load (``path``: its file, resolved)."""
        return cls((IncludedFile(path, source or UNNAMED_DOCUMENT),))

    @property
    def is_top(self) -> bool:
        """True for the loaded document itself, False for a file it includes."""
        return len(self.files) == 1

    @property
    def current(self) -> IncludedFile:
        """The file being read: the last of the chain."""
        return self.files[-1]

    def text(self) -> str:
        """``main.yaml → review.yaml``: how a problem in the last file names its place."""
        return CHAIN_ARROW.join(file.name for file in self.files)

    def cycle_to(self, path: Path) -> str | None:
        """``a.yaml → b.yaml → a.yaml`` if including ``path`` closes a cycle, else None.

        A file included twice on different paths (a diamond) is no cycle:
        only the files on this chain count.
        """
        for position, file in enumerate(self.files):
            if file.path == path:
                names = [included.name for included in self.files[position:]]
                return CHAIN_ARROW.join([*names, file.name])
        return None

    def entering(self, path: Path, name: str) -> IncludeChain:
        """This chain continued by the file at ``path``."""
        return IncludeChain((*self.files, IncludedFile(path, name)))


def subgraph_path(reference: Any, base_dir: Path | None, *, confined: bool) -> Path:
    """The file ``subgraph: reference`` names, resolved; ``ValueError`` says why it cannot be used.

    Relative paths resolve against ``base_dir``, the directory of the file
    naming them. ``confined`` (a Lua-only document) keeps them inside it,
    as ``file:`` references are kept.
    """
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"'subgraph' must be the path of a YAML workflow file, got {reference!r}")
    path = Path(reference)
    if base_dir is None and (confined or not path.is_absolute()):
        raise ValueError(f"subgraph {reference!r}: a relative path needs load_from_file or "
                         f"base_dir" if not confined else
                         f"subgraph {reference!r}: a Lua-only document needs load_from_file or "
                         f"base_dir to confine its files")
    if confined:
        assert base_dir is not None
        try:
            path = contained_file(base_dir, reference)
        except ValueError as exc:
            raise ValueError(f"subgraph {reference!r} {exc} (allow_python=False)") from None
    elif not path.is_absolute():
        assert base_dir is not None
        path = base_dir / path
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte; a symlink loop (3.11)
        raise ValueError(f"subgraph {reference!r} is not a usable path ({exc})") from None
    if not resolved.is_file():
        what = "is not a file" if resolved.exists() else "does not exist"
        raise ValueError(f"subgraph {reference!r}: {str(resolved)!r} {what}")
    return resolved
