"""Programs the checkpoint tests run in processes of their own (not a test module).

``python checkpoint_agents.py map DB RUN_ID MARKS ITEMS RESULT`` runs (or, if
the run exists, resumes) a map of ITEMS items on the process backend with a
checkpointer on DB. Each branch first creates a file in MARKS (so the test
counts executions), and the program prints one line per event (``run``,
``branch``) so the test can pick its moment; the final state goes to RESULT.

``python checkpoint_agents.py writers DB THREADS RUNS`` has THREADS threads
each record RUNS small runs in DB at once, then prints how many succeeded.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from isobranch import END, START, SqliteCheckpointer, StateGraph


def body(state: dict) -> dict:
    Path(state["marks"], f"{state['item']}.{uuid.uuid4().hex}").touch()
    time.sleep(0.002)
    return {"square": state["item"] ** 2, "item": (state["item"], "done")}


def join(state: dict, results: list) -> dict:
    return {"squares": [r.state["square"] for r in results],
            "pairs": [r.state["item"] for r in results],
            "ok": all(r.success for r in results)}


def map_graph() -> StateGraph:
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(state["n"]))})
    graph.add_node("body", body)
    graph.add_fan_in_node("join", join)
    graph.add_node("total", lambda state: {"total": sum(state["squares"])})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", "total")
    graph.add_edge("total", END)
    return graph


def run_map(database: str, run_id: str, marks: str, items: int, result: str) -> int:
    checkpointer = SqliteCheckpointer(database)
    with map_graph().compile(isolation="process", max_workers=2,
                             checkpointer=checkpointer) as app:
        if checkpointer.get_run(run_id) is None:
            events = app.stream({"marks": marks, "n": items}, config={"run_id": run_id})
        else:
            events = app.resume_stream(run_id)
        final = None
        try:
            for event in events:
                if event["type"] in ("run", "branch"):
                    print(event["type"], flush=True)
                elif event["type"] == "final":
                    final = event["state"]
        except KeyboardInterrupt:
            return 130
    partial = f"{result}.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as out:
        json.dump(final, out, sort_keys=True)
    os.replace(partial, result)
    return 0


def tiny_graph() -> StateGraph:
    graph = StateGraph()
    graph.add_node("start", lambda state: {"items": list(range(8))})
    graph.add_node("body", lambda state: {"v": state["item"] + state["base"]})
    graph.add_fan_in_node("join", lambda state, results: {
        "total": sum(r.state["v"] for r in results)})
    graph.add_edge(START, "start")
    graph.add_map_edge("start", "body", over="items", fan_in="join")
    graph.add_edge("body", "join")
    graph.add_edge("join", END)
    return graph


def writers(database: str, threads: int, runs: int) -> int:
    checkpointer = SqliteCheckpointer(database)
    errors: list[BaseException] = []
    done = []
    with tiny_graph().compile(isolation="inline", checkpointer=checkpointer) as app:
        def work(lane: int) -> None:
            try:
                for run in range(runs):
                    run_id = f"{os.getpid()}-{lane}-{run}"
                    final = app.invoke({"base": run}, config={"run_id": run_id})
                    assert final["total"] == sum(range(8)) + 8 * run, final
                    done.append(run_id)
            except BaseException as exc:  # reported below, whatever it is
                errors.append(exc)

        lanes = [threading.Thread(target=work, args=(lane,)) for lane in range(threads)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
    for error in errors:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    print(len(done))
    return 1 if errors else 0


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "map":
        database, run_id, marks, items, result = arguments
        sys.exit(run_map(database, run_id, marks, int(items), result))
    database, threads, runs = arguments
    sys.exit(writers(database, int(threads), int(runs)))
