"""The checkpoint state codec against plain ``json``: encode + decode of one state.

A checkpointer encodes the state after every node and every branch result, so
the codec's cost over ``json.dumps`` + ``json.loads`` is the part of
checkpointing that grows with the state. Run alone with
``python -m benchmarks.checkpoint_codec`` (or as the ``codec-small`` and
``codec-20k`` rows of ``python -m benchmarks``).
"""

from __future__ import annotations

import json
import sys

from isobranch.checkpoint.codec import decode_value, encode_value

from .cases import Row, comparison_row, round_robin_best, twenty_k_state


def small_state() -> dict:
    """A state of 10 keys, like one after a typical node."""
    return {"query": "find the failing docs", "count": 3, "score": 0.75, "ok": True, "error": None,
            "tags": ["a", "b", "c"], "meta": {"source": "nightly", "version": 2},
            "ids": [11, 12, 13], "name": "run-7", "step": 7}


def codec_vs_json(size: str = "small", repeat: int = 9) -> Row:
    """Encode + decode of a ``size`` ("small" or "20k") state, against ``json.dumps`` +
    ``json.loads`` of the same state with json's defaults, alternating so drift hits both
    alike. (The codec writes compact JSON, so its decoding can beat ``json.loads`` of
    json's default output.)"""
    state = small_state() if size == "small" else twenty_k_state()
    batch = 2000 if size == "small" else 1  # a small state takes microseconds: time batches
    text = encode_value(state)
    assert decode_value(text) == state
    plain_text = json.dumps(state)

    def dumps() -> None:
        for _ in range(batch):
            json.dumps(state)

    def loads() -> None:
        for _ in range(batch):
            json.loads(plain_text)

    def encode() -> None:
        for _ in range(batch):
            encode_value(state)

    def decode() -> None:
        for _ in range(batch):
            decode_value(text)

    dumps_s, loads_s, encode_s, decode_s = (
        seconds / batch for seconds in round_robin_best([dumps, loads, encode, decode], repeat))
    baseline, measured = dumps_s + loads_s, encode_s + decode_s
    label = "10-key" if size == "small" else "20k-item"
    return comparison_row(f"checkpoint codec, encode+decode of a {label} state, vs json",
                          baseline, measured,
                          f"json {baseline * 1e3:.3f} ms, codec {measured * 1e3:.3f} ms per state; "
                          f"encode {encode_s / dumps_s:.2f}x dumps, "
                          f"decode {decode_s / loads_s:.2f}x loads")


def main() -> int:
    """Print both rows."""
    for size in ("small", "20k"):
        row = codec_vs_json(size)
        print(f"{row.name:<62} {row.ratio:>6.2f}x  {row.detail}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
