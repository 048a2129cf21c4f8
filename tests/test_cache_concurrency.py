"""One cache file shared at once by processes and threads: no "database is locked", no torn entry."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from isobranch import SqliteCache

KEYS = [f"key-{n}" for n in range(8)]
ROUNDS = 150


def _value(key: str, writer: str, round_: int) -> str:
    payload = f"{key}/{writer}/{round_}/" * 200  # large enough to span pages
    return json.dumps({"key": key, "payload": payload,
                       "digest": hashlib.sha256(payload.encode()).hexdigest()})


def _whole(key: str, text: str) -> bool:
    value = json.loads(text)
    return (value["key"] == key
            and hashlib.sha256(value["payload"].encode()).hexdigest() == value["digest"])


def _hammer(path: str, writer: str) -> list[str]:
    """Write and read every key ROUNDS times from two threads; return what went wrong."""
    cache = SqliteCache(path)
    problems: list[str] = []

    def work(thread: int) -> None:
        try:
            for round_ in range(ROUNDS):
                for key in KEYS:
                    cache.put(key, "node", _value(key, f"{writer}.{thread}", round_), None)
                    text = cache.get(key)
                    if text is None or not _whole(key, text):
                        problems.append(f"{key}: torn or missing entry")
        except Exception as exc:  # the test's whole point: nothing may reach the caller
            problems.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    return problems


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_processes_and_threads_write_and_read_the_same_keys(tmp_path: Path):
    path = str(tmp_path / "cache.db")
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_hammer, [(path, f"p{n}") for n in range(4)])
    assert results == [[], [], [], []]
    cache = SqliteCache(path)
    assert len(cache) == len(KEYS)
    assert all(_whole(key, cache.get(key)) for key in KEYS)
    cache.close()
