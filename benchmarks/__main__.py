"""Run every benchmark case and print the table (``--json FILE`` saves it)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from . import (
    async_cases,
    cache_cases,
    cases,
    checkpoint_cases,
    checkpoint_codec,
    dask_map_cases,
    interrupt_cases,
    map_cases,
    observe_cases,
    reducer_cases,
    subgraph_cases,
)

NAMES = ["vm", "hook", "lua-threads", "overhead-thread", "overhead-inline", "hot-loop-process",
         "python-processes", "overhead-process", "overhead-fresh", "state-copy", "round-trip",
         "lua-small-read",
         "soak-thread", "soak-process", "python-dask", "overhead-dask", "dask-start",
         "map-process", "map-thread", "map-thread-2", "map-width-thread", "map-width-process",
         "map-dask", "map-dask-client", "map-dask-long",
         "codec-small", "codec-20k", "ainvoke", "reducer-map-thread", "reducer-width-thread",
         "checkpoint-process", "checkpoint-thread", "stream-updates", "otel-no-provider",
         "otel-exporter", "subgraph-map-thread", "subgraph-map-process", "interrupt-resume",
         "cache-hit", "replay-suite"]


def main(argv: list[str] | None = None) -> int:
    """Measure every performance target that applies, print a table, exit 1 on a miss."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME",
                        help=f"run only these rows ({', '.join(NAMES)})")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0

    def reps(n: int) -> int:
        return max(int(n * scale), 2)

    runs = [
        lambda: cases.vm_creation(repeat=reps(2000)),
        lambda: cases.hot_loop_thread_hook(repeat=reps(5)),
        lambda: cases.lua_branches_thread_vs_inline(repeat=reps(5)),
        lambda: cases.per_branch_overhead("thread", 0.2, repeat=reps(30)),
        lambda: cases.per_branch_overhead("inline", None, repeat=reps(30)),
        lambda: cases.hot_loop_process(repeat=reps(5)),
        lambda: cases.python_branches_process_vs_inline(repeat=reps(5)),
        lambda: cases.per_branch_overhead("process", 1.0, repeat=reps(30)),
        lambda: cases.per_branch_overhead("process", None, repeat=reps(10), branches=16,
                                          fresh_worker_per_branch=True),
        lambda: cases.state_copy(repeat=reps(7)),
        lambda: cases.lua_round_trip(repeat=reps(5)),
        lambda: cases.lua_small_read(repeat=reps(200)),
        lambda: cases.branch_soak(branches=2_000 if args.quick else 10_000),
        lambda: cases.branch_soak(branches=2_000 if args.quick else 10_000, isolation="process"),
        lambda: cases.python_branches_dask_vs_process(repeat=reps(5)),
        lambda: cases.per_branch_overhead("dask", None, repeat=reps(30)),
        lambda: cases.dask_start_tls_vs_plain(repeat=reps(5)),
        lambda: map_cases.map_process_vs_pool(repeat=reps(5)),
        lambda: map_cases.map_thread_vs_pool(repeat=reps(5)),
        lambda: map_cases.map_thread_vs_pool(workers=2, repeat=reps(5)),
        lambda: map_cases.map_width_scaling("thread", repeat=reps(5)),
        lambda: map_cases.map_width_scaling("process", repeat=reps(3)),
        lambda: map_cases.map_dask_vs_process(repeat=reps(3)),
        lambda: dask_map_cases.map_dask_vs_client_map(repeat=reps(3)),
        lambda: dask_map_cases.map_dask_long_vs_client_map(repeat=reps(2)),
        lambda: checkpoint_codec.codec_vs_json("small", repeat=reps(9)),
        lambda: checkpoint_codec.codec_vs_json("20k", repeat=reps(9)),
        lambda: async_cases.ainvoke_overhead(repeat=reps(7)),
        lambda: reducer_cases.reducer_vs_fan_in_code("thread", repeat=reps(5)),
        lambda: reducer_cases.reducer_width_scaling("thread", repeat=reps(5)),
        lambda: checkpoint_cases.map_with_checkpointer("process", repeat=reps(9)),
        lambda: checkpoint_cases.map_with_checkpointer("thread", repeat=reps(9)),
        lambda: observe_cases.stream_updates_event_size(repeat=reps(3)),
        lambda: observe_cases.tracing_overhead(False, repeat=reps(15)),
        lambda: observe_cases.tracing_overhead(True, repeat=reps(15)),
        lambda: subgraph_cases.subgraph_map_vs_node_map("thread", repeat=reps(7)),
        lambda: subgraph_cases.subgraph_map_vs_node_map("process", repeat=reps(7)),
        lambda: interrupt_cases.interrupt_and_resume(repeat=reps(30)),
        lambda: cache_cases.cache_hit(repeat=reps(7)),
        lambda: cache_cases.replayed_suite(cases=40 if args.quick else 200),
    ]
    if args.only:
        runs = [run for run, name in zip(runs, NAMES, strict=True) if name in args.only]
    rows = []
    print(f"{'benchmark':<62} {'target':<26} {'ratio':>8}  verdict  detail")
    for run in runs:
        row = run()
        rows.append(row)
        verdict = "ok" if row.ok else "MISSED"
        print(f"{row.name:<62} {row.target:<26} {row.ratio:>8.2f}  {verdict:<7}  {row.detail}",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"python": sys.version, "machine": platform.machine(),
                       "rows": [row.as_dict() for row in rows]}, out, indent=2)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
