"""Run generated hostile Lua programs and check that every one ends at its time limit.

    python -m benchmarks.fuzz --programs 20000 [--timeout 0.3] [--seed 0] [--workers 2]

Each program (``benchmarks.hostile_lua``) runs in a ``LuaRuntime`` inside a
child process; a few children each run many programs, one at a time, and
report each one. A program passes when it ends with ``LuaTimeoutError``
within ``timeout + margin`` seconds and the same runtime then computes
``return 1 + 1``. A child that does not report in time is killed, so an
escape fails the run instead of hanging it. A program that overran (but did
end) is run once more on its own before it counts as a failure, so that a
moment of load on the machine is not taken for an escape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .hostile_lua import hostile_program

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 0.3
DEFAULT_MARGIN = 0.5
# How long past timeout + margin a child may stay silent before it is killed:
# past this the program is taken to have escaped for good.
KILL_AFTER = 5.0


@dataclass
class Outcome:
    """What one program did."""

    seed: int
    status: str  # "timeout", another exception's name, "returned", or "killed"
    elapsed: float
    recovered: bool
    detail: str = ""

    def passed(self, timeout: float, margin: float) -> bool:
        """Ended with a timeout, in time, and left a working runtime."""
        return self.status == "timeout" and self.recovered and self.elapsed <= timeout + margin


@dataclass
class Report:
    """Every outcome of one run, and the failures among them."""

    timeout: float
    margin: float
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0
    child_cpu_seconds: float = 0.0

    def describe_failures(self, limit: int = 5) -> str:
        """The failed programs, each with its outcome and its full text."""
        parts = []
        for outcome in self.failures[:limit]:
            parts.append(f"seed {outcome.seed}: {outcome.status} after {outcome.elapsed:.2f}s "
                         f"(limit {self.timeout}s + {self.margin}s), runtime usable again: "
                         f"{outcome.recovered} {outcome.detail}\n{hostile_program(outcome.seed)}")
        more = len(self.failures) - limit
        if more > 0:
            parts.append(f"... and {more} more")
        return "\n".join(parts)


# -- child side ---------------------------------------------------------------

def _child(timeout: float) -> int:
    """Run the programs whose seeds arrive on stdin; one JSON line per program on stdout."""
    from isobranch import LuaRuntime, LuaTimeoutError

    runtime = LuaRuntime(timeout=timeout)
    for line in sys.stdin:
        seed = int(line)
        code = hostile_program(seed)
        detail = ""
        start = time.monotonic()
        try:
            runtime.execute(code, chunk_name=f"hostile{seed}")
            status = "returned"
        except LuaTimeoutError:
            status = "timeout"
        except Exception as exc:
            status, detail = type(exc).__name__, str(exc)[:300]
        elapsed = time.monotonic() - start
        try:
            recovered = runtime.execute("return 1 + 1") == 2
        except Exception as exc:
            recovered, detail = False, f"{detail} then: {type(exc).__name__}: {exc}"[:300]
        sys.stdout.write(json.dumps({"seed": seed, "status": status, "elapsed": elapsed,
                                     "recovered": recovered, "detail": detail}) + "\n")
        sys.stdout.flush()
    return 0


# -- parent side --------------------------------------------------------------

class _Child:
    """One child process running programs one at a time."""

    def __init__(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fuzz", "--child", "--timeout", str(timeout)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        self.buffer = b""

    def run(self, seed: int, limit: float) -> Outcome:
        """Send one seed; its outcome, or a "killed" one if no answer comes within ``limit``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        start = time.monotonic()
        try:
            self.process.stdin.write(f"{seed}\n".encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            return Outcome(seed, "killed", 0.0, False, "the child process had exited")
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = start + limit - time.monotonic()
            ready = select.select([fd], [], [], max(remaining, 0))[0] if remaining > 0 else []
            if not ready:
                self.close()
                return Outcome(seed, "killed", time.monotonic() - start, False,
                               f"no answer within {limit:g}s: the child was killed")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.close()
                return Outcome(seed, "killed", time.monotonic() - start, False,
                               f"the child process died (exit code {self.process.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        data = json.loads(line)
        return Outcome(data["seed"], data["status"], data["elapsed"], data["recovered"],
                       data["detail"])

    def close(self) -> None:
        """End the child (killing it if it is still busy) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()

    def finish(self) -> None:
        """Let an idle child exit on its own."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            pass
        self.close()


def _run_seeds(seeds: Iterable[int], timeout: float, margin: float,
               workers: int) -> list[Outcome]:
    """Outcomes of ``seeds`` spread over ``workers`` children (a killed child is replaced)."""
    pending: Iterator[int] = iter(seeds)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def next_seed() -> int | None:
        with lock:
            return next(pending, None)

    def work() -> None:
        child = _Child(timeout)
        try:
            while (seed := next_seed()) is not None:
                outcome = child.run(seed, timeout + margin + KILL_AFTER)
                with lock:
                    outcomes.append(outcome)
                if outcome.status == "killed":
                    child = _Child(timeout)
        except BaseException as exc:  # reported by the caller, never lost in a thread
            errors.append(exc)
        finally:
            child.finish()

    threads = [threading.Thread(target=work, name=f"fuzz-child-{i}") for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sorted(outcomes, key=lambda outcome: outcome.seed)


def run_corpus(programs: int, *, timeout: float = DEFAULT_TIMEOUT, margin: float = DEFAULT_MARGIN,
               first_seed: int = 0, workers: int = 2) -> Report:
    """Run ``programs`` generated programs (seeds ``first_seed``...) and report every outcome."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    report = Report(timeout, margin)
    report.outcomes = _run_seeds(range(first_seed, first_seed + programs), timeout, margin,
                                 workers)
    overran = [o for o in report.outcomes if not o.passed(timeout, margin)]
    # Only a lateness is retried (on its own): a wrong outcome is never load.
    late = [o.seed for o in overran if o.status == "timeout" and o.recovered]
    retried = {o.seed: o for o in _run_seeds(late, timeout, margin, 1)} if late else {}
    report.failures = [retried.get(o.seed, o) for o in overran
                       if not retried.get(o.seed, o).passed(timeout, margin)]
    report.wall_seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report.child_cpu_seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime +
                                                                    before.ru_stime)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line: run a corpus, print a summary and the failures; exit 1 on any failure."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=2000, help="how many programs to run")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="Lua time limit per program, in seconds")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="how far past the limit a program may end, in seconds")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--workers", type=int, default=2, help="child processes")
    parser.add_argument("--show", type=int, metavar="SEED", help="print one program and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.timeout)
    if args.show is not None:
        print(hostile_program(args.show))
        return 0
    report = run_corpus(args.programs, timeout=args.timeout, margin=args.margin,
                        first_seed=args.seed, workers=args.workers)
    slowest = max(report.outcomes, key=lambda outcome: outcome.elapsed)
    print(f"{len(report.outcomes)} programs, timeout {args.timeout}s: {len(report.failures)} "
          f"failed; slowest seed {slowest.seed} ended after {slowest.elapsed:.3f}s; "
          f"{report.wall_seconds:.1f}s wall, {report.child_cpu_seconds:.1f}s CPU in children")
    if report.failures:
        print(report.describe_failures(limit=20))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
