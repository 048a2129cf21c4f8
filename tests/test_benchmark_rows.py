"""The benchmark table's verdicts: a row is ok exactly when its measurement meets its target."""

from __future__ import annotations

import pytest
from benchmarks import __main__ as table
from benchmarks import cases
from benchmarks.cases import Row, slowdown_row, speedup_row


def test_a_speedup_row_is_ok_from_its_target_speedup_on():
    met = speedup_row("x", 2.0, baseline=1.0, measured=0.5, detail="")
    short = speedup_row("x", 2.0, baseline=1.0, measured=0.51, detail="")
    assert (met.ok, met.ratio, met.target) == (True, 2.0, ">= 2x faster")
    assert not short.ok and short.ratio == pytest.approx(1.96, abs=0.01)


def test_a_slowdown_row_is_ok_up_to_its_limit_and_missed_past_it():
    met = slowdown_row("x", 1.1, "bare lupa", baseline=1.0, measured=1.1, detail="")
    past = slowdown_row("x", 1.1, "bare lupa", baseline=1.0, measured=1.12, detail="")
    assert (met.ok, met.target) == (True, "<= 1.1x bare lupa")
    assert not past.ok and past.ratio == pytest.approx(1.12)


def test_a_missed_row_is_printed_as_missed_and_fails_the_run(monkeypatch, capsys):
    missed = Row("a row that missed", "<= 2x bare lupa", 1.0, 3.0, 3.0, False, "3x")
    monkeypatch.setattr(cases, "vm_creation", lambda repeat: missed)
    assert table.main(["--only", "vm"]) == 1
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "a row that missed" in line]
    assert "MISSED" in line.split()


def test_a_run_whose_rows_are_met_succeeds(monkeypatch, capsys):
    met = Row("a row that met", "<= 2x bare lupa", 1.0, 1.5, 1.5, True, "1.5x")
    monkeypatch.setattr(cases, "vm_creation", lambda repeat: met)
    assert table.main(["--only", "vm"]) == 0
    assert "MISSED" not in capsys.readouterr().out


def _measuring(monkeypatch, helper: str, given: list) -> None:
    """``cases.<helper>`` returns the ``given`` timings in turn instead of measuring."""
    monkeypatch.setattr(cases, helper, lambda *args, **kwargs: given.pop(0))


def test_the_per_branch_overhead_row_is_ok_up_to_its_target_and_missed_past_it(monkeypatch):
    # A 1-branch and a 64-branch fan-out, twice: the 63 extra branches cost
    # 0.199 ms each, then 0.201 ms.
    _measuring(monkeypatch, "median_of", [0.01, 0.01 + 63 * 0.000199, 0.01, 0.01 + 63 * 0.000201])
    met = cases.per_branch_overhead("inline", 0.2, repeat=1)
    past = cases.per_branch_overhead("inline", 0.2, repeat=1)
    assert (met.ok, met.target) == (True, "<= 0.2 ms") and met.ratio == pytest.approx(0.995)
    assert not past.ok and past.ratio == pytest.approx(1.005)


def test_the_small_read_row_is_ok_up_to_2_ms_and_missed_past_it(monkeypatch):
    _measuring(monkeypatch, "paired_best", [(0.0001, 0.002), (0.0001, 0.0021)])
    met, past = cases.lua_small_read(repeat=1), cases.lua_small_read(repeat=1)
    assert (met.ok, met.target) == (True, "<= 2 ms") and met.ratio == pytest.approx(1.0)
    assert not past.ok and past.ratio == pytest.approx(1.05)


def test_the_cache_hit_row_holds_both_targets(monkeypatch):
    from benchmarks import cache_cases

    batch = 500
    # (run, hit) per invoke: within both; 1.5x + 0.1 ms broken; 0.2 ms more broken.
    for run, hit, ok in [(0.0001, 0.00024, True), (0.0001, 0.00026, False),
                         (0.001, 0.00121, False)]:
        monkeypatch.setattr(cache_cases, "round_robin_best",
                            lambda fns, repeat, run=run, hit=hit: [run * batch, hit * batch])
        row = cache_cases.cache_hit(batch=batch, repeat=1)
        assert row.ok is ok, (run, hit)
