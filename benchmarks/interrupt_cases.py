"""Benchmark row for interrupts: a pause and its resume, against the same run without them."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from isobranch import END, START, SqliteCheckpointer, StateGraph, interrupt

from .cases import Row, added_time_row, round_robin_best

# The target of §19's row: what an interrupt and its resume add to a run.
ADDED_LIMIT_SECONDS = 0.005


def _approve(state: dict) -> dict:
    return {"ok": interrupt("send it?") if state["ask"] else "auto"}


def _approval_graph() -> StateGraph:
    graph = StateGraph()
    graph.add_node("draft", lambda state: {"draft": "hello"})
    graph.add_node("approve", _approve)
    graph.add_node("send", lambda state: {"sent": state["ok"] in ("yes", "auto")})
    graph.add_edge(START, "draft").add_edge("draft", "approve").add_edge("approve", "send")
    graph.add_edge("send", END)
    return graph


def interrupt_and_resume(repeat: int = 30) -> Row:
    """``invoke`` pausing at one node then ``resume(answer=)`` to the end, against one
    ``invoke`` of the same recorded run whose node does not ask (SQLite file checkpointer)."""
    directory = Path(tempfile.mkdtemp(prefix="isobranch-bench-"))
    run_ids = (f"bench-{n}" for n in itertools.count())
    try:
        checkpointer = SqliteCheckpointer(directory / "runs.db")
        with _approval_graph().compile(checkpointer=checkpointer) as app:

            def straight() -> None:
                final = app.invoke({"ask": False}, config={"run_id": next(run_ids)})
                assert final["sent"] is True, final

            def paused_and_resumed() -> None:
                run_id = next(run_ids)
                paused = app.invoke({"ask": True}, config={"run_id": run_id})
                assert paused["__interrupt__"][0].id == "approve", paused
                final = app.resume(run_id, answer="yes")
                assert final["sent"] is True, final

            straight()
            paused_and_resumed()
            baseline, measured = round_robin_best([straight, paused_and_resumed], repeat)
        checkpointer.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    added = measured - baseline
    return added_time_row("interrupt + resume of one node, SQLite checkpointer",
                          ADDED_LIMIT_SECONDS, baseline, measured,
                          f"{added * 1000:.2f} ms added ({baseline * 1000:.2f} ms without the pause, "
               f"{measured * 1000:.2f} ms paused and resumed)")
