"""Generated hostile Lua programs (benchmarks.hostile_lua): every one ends at its time limit.

The default run is a bounded, deterministic slice: FUZZ_PROGRAMS seeds from 0,
in child processes that are killed if a program does not end, so an escape
fails this test (printing the program) instead of hanging the suite. A longer
run: ``python -m benchmarks.fuzz --programs 20000`` (0.3 s limit), or set
ISOBRANCH_FUZZ_PROGRAMS for this test.
"""

from __future__ import annotations

import os

import pytest
from benchmarks.fuzz import DEFAULT_MARGIN, run_corpus
from benchmarks.hostile_lua import MAX_DEPTH, hostile_program

FUZZ_PROGRAMS = int(os.environ.get("ISOBRANCH_FUZZ_PROGRAMS", "500"))
# Shorter than the CLI's 0.3 s so that 500 programs cost under a minute of
# CPU: every program spins until its deadline, and what is checked (nothing
# runs on after the deadline) does not depend on how long the limit is.
FUZZ_TIMEOUT = 0.1


@pytest.mark.stress
def test_no_generated_program_outlives_its_timeout():
    report = run_corpus(FUZZ_PROGRAMS, timeout=FUZZ_TIMEOUT, margin=DEFAULT_MARGIN, workers=2)
    assert len(report.outcomes) == FUZZ_PROGRAMS
    assert not report.failures, report.describe_failures()


def test_the_generator_is_deterministic_and_varied():
    assert hostile_program(7) == hostile_program(7)
    programs = {hostile_program(seed) for seed in range(200)}
    assert len(programs) > 190  # a few tiny programs repeat
    corpus = "\n".join(programs)
    for construct in ("pcall(", "xpcall(", "coroutine.create(", "coroutine.wrap(",
                      "coroutine.yield()", "coroutine.close(", "coroutine.isyieldable()",
                      "coroutine.running()", "goto ", "repeat ", "<close>", "__index", "__newindex",
                      "__call", "__tostring", "__eq", "__lt", "__le", "__concat", "__len", "__unm",
                      "string.gsub(", "table.sort(", "load(function()", "load([",
                      "error(setmetatable(", "POOL["):
        assert construct in corpus, construct


def test_generated_programs_nest_to_the_maximum_depth():
    # A program's nesting shows in its load() long brackets, one level per depth.
    deepest = max(max((len(part) - len(part.lstrip("=")) for part in
                       hostile_program(seed).split("load([")[1:]), default=0)
                  for seed in range(500))
    assert deepest == MAX_DEPTH
