"""Comparing a final state with a case's ``expect``: subset matching and one line per difference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from .text import join_key, short

# Differences listed for one case; the rest are counted.
MAX_DIFF_LINES = 20
# Strings longer than this also get the first differing character pointed out,
# with this many characters of each side from there.
LONG_STRING_CHARS = 40
STRING_EXCERPT_CHARS = 30
# Items of each list shown from the first index where two lists differ.
LIST_EXCERPT_ITEMS = 3


class Difference(NamedTuple):
    """One place where a final state does not match ``expect``.

    ``label`` names it in a report's headline, ``line`` describes it, and
    ``keys`` is where it is: the keys and list indexes from the top of
    ``expect`` down to the value that differs (what an update rewrites).
    """

    label: str
    line: str
    keys: tuple[Any, ...]


def subset_differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Readable lines for every place ``actual`` does not match ``expected``.

    Mappings are matched as subsets (recursively); everything else exactly.
    An empty list means the values match.
    """
    return [line for _, line in differences(expected, actual, path)]


def differences(expected: Any, actual: Any, path: str = "") -> list[tuple[str, str]]:
    """``(short label, line)`` per difference, capped at ``MAX_DIFF_LINES``."""
    found = [(label, line) for label, line, _ in all_differences(expected, actual, path)]
    if len(found) > MAX_DIFF_LINES:
        more = len(found) - MAX_DIFF_LINES
        found = [*found[:MAX_DIFF_LINES], ("...", f"... and {more} more difference{'s' * (more != 1)}")]
    return found


def all_differences(expected: Any, actual: Any, path: str = "") -> list[Difference]:
    """Every difference, uncapped, in the order a report lists them."""
    found: list[Difference] = []
    _diff(expected, actual, path, (), subset=True, out=found)
    return found


def values_equal(expected: Any, actual: Any) -> bool:
    """Exact equality, except that numbers compare by value and bools are not numbers."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return expected.keys() == actual.keys() and all(
            values_equal(value, actual[key]) for key, value in expected.items())
    if _is_list(expected) and _is_list(actual):
        return len(expected) == len(actual) and all(
            values_equal(a, b) for a, b in zip(expected, actual, strict=True))
    if _is_list(expected) or _is_list(actual) or isinstance(expected, Mapping) or isinstance(
            actual, Mapping):
        return False
    try:
        return bool(expected == actual)
    except Exception:  # an odd object's __eq__ must not crash the report
        return False


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _diff(expected: Any, actual: Any, path: str, keys: tuple[Any, ...], *, subset: bool,
          out: list[Difference]) -> None:
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            where = path or "final state"
            out.append(Difference(where, f"{where}: expected a mapping {short(expected)}, "
                                         f"got {_kind(actual)} {short(actual)}", keys))
            return
        for key, value in expected.items():
            child = join_key(path, key)
            if key not in actual:
                out.append(Difference(f"{child} missing",
                                      f"missing key: {child} (expected {short(value)})",
                                      (*keys, key)))
            else:
                _diff(value, actual[key], child, (*keys, key), subset=subset, out=out)
        if not subset:
            for key in actual:
                if key not in expected:
                    child = join_key(path, key)
                    out.append(Difference(f"{child} unexpected",
                                          f"unexpected key: {child} = {short(actual[key])}",
                                          (*keys, key)))
        return
    if _is_list(expected) and _is_list(actual):
        if len(expected) != len(actual):
            line = (f"{path}: expected {len(expected)} item{'s' * (len(expected) != 1)}, "
                    f"got {len(actual)}")
            at = next((i for i, (want, got) in enumerate(zip(expected, actual, strict=False))
                       if not values_equal(want, got)), min(len(expected), len(actual)))
            window = slice(at, at + LIST_EXCERPT_ITEMS)
            line += (f"; first difference at index {at}: expected "
                     f"{short(list(expected[window]))}, got {short(list(actual[window]))}")
            out.append(Difference(path, line, keys))
            return
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            # Inside a list nothing is a subset: a list states the whole value.
            _diff(want, got, f"{path}[{index}]", (*keys, index), subset=False, out=out)
        return
    if not values_equal(expected, actual):
        out.append(Difference(path, _mismatch(path, expected, actual), keys))


def _mismatch(path: str, expected: Any, actual: Any) -> str:
    line = f"{path}: expected {short(expected)}, got {short(actual)}"
    if type(expected) is not type(actual) and not (_is_number(expected) and _is_number(actual)):
        line += f" ({_kind(actual)}, not {_kind(expected)})"
    elif (isinstance(expected, str) and isinstance(actual, str)
          and max(len(expected), len(actual)) > LONG_STRING_CHARS):
        at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                  min(len(expected), len(actual)))
        window = slice(at, at + STRING_EXCERPT_CHARS)
        line += (f"\n    first difference at character {at}: expected {expected[window]!r}, "
                 f"got {actual[window]!r}")
    return line


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    return {list: "a list", tuple: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float", type(None): "null"}.get(type(value), type(value).__name__)
