"""Retry policies: when a failed node or branch runs again, and how long it waits first.

A ``RetryPolicy`` is plain frozen data (it travels to worker processes with
the graph). Which failures it retries is decided by exception class *names*,
because a branch's failure crosses process boundaries as names only: a name
in ``retry_on`` matches a class of that name or any class derived from one.
The backoff before attempt *n + 1* is ``initial_interval * backoff_factor **
(n - 1)``, capped at ``max_interval``; with ``jitter`` it is drawn uniformly
between half of that and all of it, so retries of many branches that failed
together spread out and never exceed the cap.
"""

from __future__ import annotations

import random as random_module
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from .error_kinds import ErrorKind
from .errors import (
    BranchTimeout,
    ConfigError,
    LuaConversionError,
    LuaMemoryError,
    LuaRuntimeError,
    LuaTimeoutError,
)
from .keys import unknown


def exception_names(exc_type: type[BaseException]) -> tuple[str, ...]:
    """The names of ``exc_type``'s bases, nearest first (without itself and ``object``)."""
    return tuple(cls.__name__ for cls in exc_type.__mro__[1:] if cls is not object)


# Exceptions that say the code is wrong, not that the world was: running the
# same code on the same input again fails the same way. A node policy without
# ``retry_on`` retries everything else.
PROGRAMMING_ERRORS: tuple[str, ...] = (
    "SyntaxError", "NameError", "TypeError", "ValueError", "KeyError", "IndexError",
    "AttributeError", "AssertionError", "NotImplementedError")
# What a branch policy without ``retry_on`` retries: the branch's worker went
# away, or the branch ran out of time. Not ``BranchMemoryError``: a branch that
# outgrew its memory limit once does so again on the same input.
BRANCH_RETRY_ON: tuple[str, ...] = tuple(kind.value for kind in (
    ErrorKind.WORKER_CRASHED, ErrorKind.WORKER_DIED, ErrorKind.BRANCH_TIMEOUT))
# A branch stopped because of a sibling (fail_fast) or its fan-out being
# closed failed through no fault of its own: never retried.
NEVER_RETRIED: frozenset[str] = frozenset({ErrorKind.CANCELLED.value})
# Bases of the failures the engine itself reports by name (the class itself
# may not exist where the result is judged: a worker reports "WorkerCrashed").
KNOWN_BASES: Mapping[str, tuple[str, ...]] = {
    "LuaRuntimeError": exception_names(LuaRuntimeError),
    ErrorKind.LUA_TIMEOUT_ERROR.value: exception_names(LuaTimeoutError),
    "LuaMemoryError": exception_names(LuaMemoryError),
    "LuaConversionError": exception_names(LuaConversionError),
    ErrorKind.BRANCH_TIMEOUT.value: exception_names(BranchTimeout),
    ErrorKind.BRANCH_MEMORY_ERROR.value: ("MemoryError", "Exception"),
    ErrorKind.WORKER_CRASHED.value: ("Exception",),
    ErrorKind.WORKER_DIED.value: ("Exception",),
}
# The keys of a ``retry:`` mapping in YAML.
RETRY_KEYS: frozenset[str] = frozenset(
    {"max_attempts", "initial_interval", "backoff_factor", "max_interval", "jitter", "retry_on"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed node or branch runs again, after how long, and for which errors.

    ``max_attempts`` counts every run, the first one included (1: no
    retry). ``retry_on`` lists exception class names (or classes); a
    failure matches if its class or one of its bases has one of those
    names. ``None`` means the default: for a node every exception but the
    programming errors in ``PROGRAMMING_ERRORS``, for a branch the failures
    in ``BRANCH_RETRY_ON``.
    """

    max_attempts: int = 3
    initial_interval: float = 0.5
    backoff_factor: float = 2.0
    max_interval: float = 30.0
    jitter: bool = True
    retry_on: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.retry_on is not None:
            object.__setattr__(self, "retry_on", _names(self.retry_on))
        problems = policy_problems(self)
        if problems:
            raise ConfigError("RetryPolicy: " + "; ".join(problems))

    def delay(self, attempt: int, random: Callable[[], float] | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based) before the next one.

        ``random`` returns a float in [0, 1) (default ``random.random``);
        tests pass their own to make jitter predictable.
        """
        try:
            growth = self.backoff_factor ** max(attempt - 1, 0)
        except OverflowError:  # far past any cap
            growth = float("inf")
        interval = min(self.initial_interval * growth, self.max_interval) \
            if self.initial_interval else 0.0
        if not self.jitter:
            return interval
        draw = (random or random_module.random)()
        return interval * (0.5 + 0.5 * draw)

    def retries(self, names: Iterable[str], default: Sequence[str] | None = None) -> bool:
        """Whether a failure whose class and bases are ``names`` is retried.

        ``default`` is what an unset ``retry_on`` means: the names that are
        retried (a branch's default), or None for "all but the programming
        errors" (a node's default).
        """
        names = set(names)
        if names & NEVER_RETRIED:
            return False
        wanted = self.retry_on if self.retry_on is not None else default
        if wanted is None:
            return not names & set(PROGRAMMING_ERRORS)
        return bool(names & set(wanted))

    def refusal(self, error_type: str | None, names: Iterable[str],
                default: Sequence[str] | None = None) -> str | None:
        """Why a failure of class ``error_type`` (whose class and bases are ``names``) is not
        retried, in words; None if it is. ``default`` is as for ``retries``."""
        names = set(names)
        if self.retries(names, default):
            return None
        what = error_type or "this failure"
        if names & NEVER_RETRIED:
            return "a branch stopped by a sibling or by its run is never retried"
        if self.retry_on is not None:
            return f"{what} is not in retry_on [{', '.join(self.retry_on)}]"
        if default is None:
            return f"{what} is a programming error, retried only if retry_on names it"
        return (f"by default only {', '.join(default)} are retried; name {what} in retry_on "
                f"to retry it")

    def to_dict(self) -> dict[str, Any]:
        """The policy as a plain mapping (as YAML writes it)."""
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        if data["retry_on"] is not None:
            data["retry_on"] = list(data["retry_on"])
        return data


def _names(retry_on: Any) -> tuple[str, ...]:
    if isinstance(retry_on, (str, type)):
        retry_on = (retry_on,)
    try:
        items = list(retry_on)
    except TypeError:
        raise ConfigError(f"retry_on must be a list of exception class names, "
                         f"got {type(retry_on).__name__}") from None
    names = []
    for item in items:
        if isinstance(item, type) and issubclass(item, BaseException):
            names.append(item.__name__)
        elif isinstance(item, str) and item.isidentifier():
            names.append(item)
        else:
            raise ConfigError(f"retry_on: {item!r} is not an exception class or class name")
    return tuple(names)


def policy_problems(policy: Any) -> list[str]:
    """What is wrong with the fields of ``policy`` (empty if nothing), each naming its field."""
    problems = []
    attempts = policy.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        problems.append(f"max_attempts must be an integer >= 1, got {attempts!r}")
    for key in ("initial_interval", "max_interval"):
        value = getattr(policy, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                or value == float("inf"):
            problems.append(f"{key} must be a number of seconds >= 0, got {value!r}")
    factor = policy.backoff_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not 1 <= factor < float("inf"):
        problems.append(f"backoff_factor must be a number >= 1, got {factor!r}")
    if not isinstance(policy.jitter, bool):
        problems.append(f"jitter must be true or false, got {policy.jitter!r}")
    return problems


def failure_names(error_type: str | None, bases: Iterable[str] = ()) -> set[str]:
    """Every name a failure answers to: its class, its bases, and known engine bases."""
    names = set(bases)
    if error_type:
        names.add(error_type)
        names.update(KNOWN_BASES.get(error_type, ()))
    return names


def not_retried_note(policy: RetryPolicy, attempt: int, error_type: str | None,
                     names: Iterable[str], default: Sequence[str] | None = None) -> str:
    """`` (not retried: why)`` for a failure that ends its node or branch before its last
    attempt; empty when it was the last attempt anyway (the attempt count says why)."""
    if attempt >= policy.max_attempts:
        return ""
    why = policy.refusal(error_type, names, default)
    return f" (not retried: {why})" if why else ""


def as_policy(value: Any, where: str) -> RetryPolicy | None:
    """``value`` (a ``RetryPolicy``, a mapping of its fields, an attempt count, or None) as a
    policy; ``ValueError`` naming ``where`` if it is none of those or is invalid."""
    if value is None or isinstance(value, RetryPolicy):
        return value
    policy, problems = parse_policy(value, where)
    if problems:
        raise ConfigError("; ".join(problems))
    return policy


def parse_policy(value: Any, where: str) -> tuple[RetryPolicy | None, list[str]]:
    """A ``retry:`` value from YAML (or a dict) as a policy, with every problem found.

    ``retry: 3`` is ``max_attempts: 3`` with the other fields at their
    defaults; ``retry: true`` is the default policy; ``retry: false`` or
    null is no retry; a mapping takes the fields of ``RetryPolicy``. Each
    problem names ``where`` and the key.
    """
    if value is None or value is False:
        return None, []
    if value is True:
        return RetryPolicy(), []
    if isinstance(value, RetryPolicy):
        return value, []
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"max_attempts": value}
    if not isinstance(value, Mapping):
        return None, [f"{where}: must be a mapping of {', '.join(sorted(RETRY_KEYS))} "
                      f"(or a number of attempts), got {type(value).__name__} {value!r}"]
    problems = [unknown(f"{where}.{key}: unknown key", key, RETRY_KEYS)
                for key in sorted(set(value) - RETRY_KEYS, key=str)]
    fields_given = {key: value[key] for key in RETRY_KEYS & set(value)}
    retry_on = fields_given.get("retry_on")
    if retry_on is not None and (not isinstance(retry_on, (list, tuple, str)) or not all(
            isinstance(name, str) and name.isidentifier()
            for name in ([retry_on] if isinstance(retry_on, str) else retry_on))):
        problems.append(f"{where}.retry_on: must be a list of exception class names, "
                        f"got {retry_on!r}")
        fields_given.pop("retry_on")
    trial = _Fields({**RetryPolicy().to_dict(), **fields_given})
    problems.extend(f"{where}.{problem}" for problem in policy_problems(trial))
    if problems:
        return None, problems
    return RetryPolicy(**fields_given), []


class _Fields:
    """Attribute access to a mapping, so YAML values are checked by ``policy_problems``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.__dict__.update(data)


class Flag(Protocol):
    """Something set once to ask a wait to end (a ``CancelSignal``)."""

    def is_set(self) -> bool: ...

    def add_callback(self, callback: Callable[[], None]) -> Callable[[], None]: ...


def wait_unless(seconds: float, flags: Iterable[Flag]) -> bool:
    """Wait ``seconds`` unless one of ``flags`` is set first; True if one was.

    A ``threading.Event`` wait, so Ctrl-C interrupts it and a flag set from
    any thread ends it at once.
    """
    flags = [flag for flag in flags if flag is not None]
    woken = threading.Event()
    forget = [flag.add_callback(woken.set) for flag in flags]
    try:
        if any(flag.is_set() for flag in flags):
            return True
        woken.wait(max(seconds, 0.0))
        return any(flag.is_set() for flag in flags)
    finally:
        for unregister in forget:
            unregister()
