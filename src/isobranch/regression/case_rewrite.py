"""Rewriting case files in place, keeping their comments, key order, quoting and layout.

``--isobranch-update`` edits a case file through ruamel.yaml's round-trip
mode, never by text surgery. A file is edited only if ruamel.yaml writes it
back byte for byte unchanged before any edit (``round_trip_problem``), so
nothing but the changed values can move; such a file (``~`` for null, an
indentation ruamel.yaml does not keep …) is left alone and the reason
reported. Each file is written once, whole: to a temporary file next to
it, then ``os.replace``.

ruamel.yaml is imported only here, and only when an update runs: it is the
``regression`` extra (``pip install 'isobranch[regression]'``).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CaseRewriteError
from .files import write_atomically
from .updates import CaseUpdate, ExpectChange, UpdateKind

# What to install when ruamel.yaml is missing.
INSTALL_HINT = "pip install 'isobranch[regression]' (or pip install ruamel.yaml)"
# Indentations tried, (mapping, sequence, dash offset): the first that
# reproduces the file is used. The project's own style comes first.
_INDENTATIONS = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 4, 0), (4, 6, 4), (2, 4, 0))
# Lines are never wrapped (a rewritten file changes only where values did).
_NO_WRAP = 1 << 20
# Longest flow-style line (``key: {a: 1, b: 2}``) a recorded container gets;
# a longer one, or one holding mappings or lists, is written in block style.
MAX_FLOW_CHARS = 80


def ruamel_available() -> bool:
    """Whether ruamel.yaml can be imported (``--isobranch-update`` needs it)."""
    try:
        import ruamel.yaml  # noqa: F401
    except ImportError:
        return False
    return True


def file_digest(text: str) -> str:
    """The digest a case update carries of the text it was planned against."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def round_trip_problem(text: str) -> str | None:
    """Why ``text`` cannot be rewritten faithfully, or None when it can."""
    try:
        _yaml_for(text)
    except CaseRewriteError as exc:
        return str(exc)
    return None


def rewrite_case_file(path: str | Path, updates: Sequence[CaseUpdate]) -> None:
    """Apply ``updates`` (all of one file) and write the file once, atomically.

    Raises ``CaseRewriteError`` — and leaves the file as it was — when the
    file changed since the updates were planned, does not round-trip, or
    no longer has the updated cases where they were.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseRewriteError(f"cannot read it: {exc}") from exc
    if any(update.digest != file_digest(text) for update in updates):
        raise CaseRewriteError("it changed during the test session; rerun to update it")
    yaml, document = _yaml_for(text)
    cases = document.get("cases") if isinstance(document, Mapping) else None
    for update in updates:
        case = cases[update.index] if isinstance(cases, list) and update.index < len(cases) else None
        if not isinstance(case, Mapping) or case.get("name") != update.name:
            raise CaseRewriteError(f"case {update.name!r} is no longer case {update.index + 1}")
        _apply(case, update)
    out = io.StringIO()
    yaml.dump(document, out)
    write_atomically(path, out.getvalue())


def _yaml_for(text: str) -> tuple[Any, Any]:
    """A round-trip ``YAML`` that writes ``text`` back unchanged, and the document it read."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    first_difference = None
    for mapping, sequence, offset in _INDENTATIONS:
        yaml = YAML(typ="rt")
        yaml.Representer = _case_representer()
        yaml.width = _NO_WRAP
        yaml.preserve_quotes = True
        # ``[{k: 1}]`` stays that, not ``[k: 1]`` (ruamel.yaml's default).
        yaml.brace_single_entry_mapping_in_flow_sequence = True
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        try:
            document = yaml.load(text)
            out = io.StringIO()
            yaml.dump(document, out)
        except YAMLError as exc:
            raise CaseRewriteError(f"ruamel.yaml cannot read it: {exc}") from exc
        written = out.getvalue()
        if written == text:
            return yaml, document
        if first_difference is None:
            first_difference = _first_difference(text, written)
    raise CaseRewriteError("ruamel.yaml would not write it back unchanged "
                           f"({first_difference}); edit it by hand")


@functools.cache
def _case_representer() -> type:
    """ruamel.yaml's round-trip representer, writing null as ``null`` and never an alias."""
    from ruamel.yaml.representer import RoundTripRepresenter

    class CaseRepresenter(RoundTripRepresenter):
        # A value recorded twice is written twice, never as an anchor and alias.
        def ignore_aliases(self, data: Any) -> bool:
            return True

        # ruamel.yaml's own writes a null block value as nothing at all.
        def represent_none(self, data: Any) -> Any:
            return self.represent_scalar("tag:yaml.org,2002:null", "null")

    CaseRepresenter.add_representer(type(None), CaseRepresenter.represent_none)
    return CaseRepresenter


def _first_difference(original: str, written: str) -> str:
    old, new = original.splitlines(), written.splitlines()
    for number, (a, b) in enumerate(zip(old, new, strict=False), start=1):
        if a != b:
            return f"line {number}: {a.strip()!r} would become {b.strip()!r}"
    return f"line {min(len(old), len(new)) + 1}: the ending would change"


def _apply(case: Any, update: CaseUpdate) -> None:
    if update.kind is UpdateKind.RECORD:
        case["expect"] = _yaml_value(update.changes[0].value)
        return
    for change in update.changes:
        _apply_change(case, change)


def _apply_change(case: Any, change: ExpectChange) -> None:
    if not change.keys:  # the whole expect differs (a mapping against a non-mapping)
        case["expect"] = _yaml_value(change.value)
        return
    container = case["expect"]
    for key in change.keys[:-1]:
        container = container[key]
    key = change.keys[-1]
    if change.delete:
        del container[key]
        return
    # ruamel.yaml's containers give a new string the quoting of the one it replaces.
    container[key] = _yaml_value(change.value)


def _yaml_value(value: Any) -> Any:
    """A plain value as ruamel.yaml objects: small containers of scalars in flow style."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, Mapping):
        converted: Any = CommentedMap((key, _yaml_value(item)) for key, item in value.items())
    elif isinstance(value, list):
        converted = CommentedSeq(_yaml_value(item) for item in value)
    else:
        return value
    items = value.values() if isinstance(value, Mapping) else value
    scalars = all(not isinstance(item, (Mapping, list)) for item in items)
    if scalars and len(value) and len(repr(value)) <= MAX_FLOW_CHARS:
        converted.fa.set_flow_style()
    elif not len(value):
        converted.fa.set_flow_style()  # {} and [], not an empty block
    else:
        converted.fa.set_block_style()
    return converted
