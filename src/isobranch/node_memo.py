"""The node cache and recorded nodes where the step loop meets them.

Before a node with a ``CachePolicy`` or marked ``replay`` runs, the step
loop (runner.py) asks ``open_memo`` whether its update is already known: a
recording on the run's tape (replay.py) or a cache entry (cache_store.py).
If so, that update is merged and the node does not run; otherwise the node
runs and ``Memo.keep`` stores what it returned. Failures are never kept.

A cache entry is keyed by the node's path (``review/score``; a map
branch's ``[3]`` left out, so items share entries), a fingerprint of the
node's code (a subgraph node's covers its inner graph) and its input: the
whole state, or only the policy's ``keys``, written canonically by the
checkpoint codec. A node whose input or update the codec cannot write
runs uncached (one DEBUG log line says why): the cache only ever saves
work, it never fails a run that would succeed without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .cache import CachePolicy
from .cache_store import SqliteCache
from .checkpoint.codec import decode_value, encode_value
from .errors import MissingRecording, NodeFailure, StateEncodeError
from .replay import ReplayMode, Tape

if TYPE_CHECKING:
    from .context import ExecutionContext

logger = logging.getLogger(__name__)

_ITEM_INDEX = re.compile(r"\[\d+\]")


class Recalled(StrEnum):
    """Where a node's update came from without running it: the key its event carries."""

    CACHED = "cached"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class CachedNode:
    """A node the cache serves: its policy and the fingerprint of its code."""

    policy: CachePolicy
    fingerprint: str


@dataclass(frozen=True)
class NodeMemos:
    """What a compiled graph knows of its cached and recorded nodes.

    ``cache`` is where entries live (None: cached nodes simply run);
    ``nodes`` every node the step loop must ask about.
    """

    cache: SqliteCache | None = None
    cached: Mapping[str, CachedNode] = field(default_factory=dict)
    replayed: frozenset[str] = frozenset()
    nodes: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        cached = self.cached if self.cache is not None else {}
        object.__setattr__(self, "nodes", frozenset(cached) | self.replayed)


NO_MEMOS = NodeMemos()


@dataclass(slots=True)
class Memo:
    """One run of a cached or recorded node: its recalled update, or where to keep it.

    ``recalled`` says where ``update`` came from (None: the node must run);
    then ``keep`` stores what it returned on ``tape`` (as call ``call`` of
    ``call_key``) and in ``cache`` (under ``cache_key`` for ``ttl`` seconds).
    """

    path: str
    branch: str | None = None
    recalled: Recalled | None = None
    update: Any = None
    tape: Tape | None = None
    call_key: str = ""
    call: int = 0
    cache: SqliteCache | None = None
    cache_key: str = ""
    ttl: float | None = None

    def keep(self, update: Any) -> None:
        """Store ``update``, what the node returned (it succeeded)."""
        if self.tape is not None:
            try:
                self.tape.record(self.call_key, self.call, update)
            except StateEncodeError as exc:
                raise NodeFailure(f"node {self.path!r}: what it returned cannot be recorded: "
                                  f"{exc}", node=self.path, branch=self.branch,
                                  error_type=type(exc).__name__) from exc
        if self.cache is not None:
            try:
                text = encode_value(update, path="update")
            except StateEncodeError as exc:
                logger.debug("node %r: update not cached: %s", self.path, exc)
                return
            self.cache.put(self.cache_key, self.path, text, self.ttl)


def open_memo(memos: NodeMemos, name: str, state: dict, context: ExecutionContext) -> Memo:
    """Ask the tape, then the cache, for the update node ``name`` would return on ``state``."""
    path = context.path_of(name)
    memo = Memo(path, context.branch_name)
    tape = context.replay
    if name in memos.replayed and tape is not None:
        key = call_key(path, context.branch_name)
        call = tape.next_call(key)
        if tape.mode is ReplayMode.REPLAY:
            try:
                memo.update = tape.play(key, call)
            except MissingRecording as exc:
                where = f"node {path!r}" + (f" in branch {context.branch_name!r}"
                                            if context.branch_name else "")
                raise NodeFailure(f"{where}: {exc}", node=path, branch=context.branch_name,
                                  error_type=type(exc).__name__, state=dict(state)) from None
            memo.recalled = Recalled.REPLAYED
            return memo
        memo.tape, memo.call_key, memo.call = tape, key, call
    cached = memos.cached.get(name)
    if cached is None or memos.cache is None:
        return memo
    try:
        key_text = _cache_key(path, cached, state)
    except StateEncodeError as exc:
        logger.debug("node %r runs uncached: its input cannot be written as a key: %s",
                     path, exc)
        return memo
    stored = memos.cache.get(key_text)
    if stored is not None:
        memo.update = decode_value(stored)
        memo.recalled = Recalled.CACHED
        return memo
    memo.cache, memo.cache_key, memo.ttl = memos.cache, key_text, cached.policy.ttl
    return memo


def call_key(path: str, branch: str | None) -> str:
    """The tape key of node ``path``'s calls: its path, in a branch under the branch's name
    (``call[3]`` for the branch's own first node, ``call[3]/post`` for a later one)."""
    if branch is None:
        return path
    last = branch.rsplit("/", 1)[-1]
    if path == _ITEM_INDEX.sub("", last):
        return branch
    if path.startswith(last + "/"):
        return branch + path[len(last):]
    return f"{branch}/{path}"


def _cache_key(path: str, cached: CachedNode, state: dict) -> str:
    keys = cached.policy.keys
    source = state if keys is None else {
        "present": {key: state[key] for key in keys if key in state},
        "missing": [key for key in keys if key not in state]}
    text = _canonical(encode_value(source, path="state"))
    identity = json.dumps([_ITEM_INDEX.sub("", path), cached.fingerprint, text])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def _canonical(text: str) -> str:
    """Codec text with dict keys sorted and sets' items in one order, so equal inputs make
    one key whatever their insertion order (or the process's string hashing)."""
    value = json.loads(text)
    if '"$ib":"set"' in text or '"$ib":"frozenset"' in text:
        value = _ordered_sets(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _ordered_sets(value: Any) -> Any:
    if isinstance(value, list):
        return [_ordered_sets(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _ordered_sets(item) for key, item in value.items()}
    if value.get("$ib") in ("set", "frozenset"):
        value["v"] = sorted(value["v"], key=lambda item: json.dumps(item, sort_keys=True))
    return value
