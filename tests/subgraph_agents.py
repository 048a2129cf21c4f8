"""A program the subgraph checkpoint tests run in a process of their own (not a test module).

``python subgraph_agents.py DB RUN_ID MARKS RESULT`` runs (or, if the run
exists, resumes) ``prep`` -> ``review`` (a subgraph: ``a`` -> ``b`` -> ``c``)
-> ``after`` with a checkpointer on DB. Every node first creates a file in
MARKS named after its path (so the test counts executions). While MARKS
holds a file ``kill-b``, node ``review/b`` deletes it and kills its own
process with SIGKILL: a crash in the middle of the subgraph, after its
step ``a`` was recorded. The final state goes to RESULT as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path

from isobranch import END, START, SqliteCheckpointer, StateGraph


def marked(path: str, update):
    """A node that leaves a mark named ``path`` in ``state["marks"]``, then returns ``update(state)``."""
    def node(state: dict) -> dict:
        marks = Path(state["marks"])
        (marks / f"{path.replace('/', '.')}.{uuid.uuid4().hex}").touch()
        if path == "review/b" and (marks / "kill-b").exists():
            (marks / "kill-b").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return update(state)
    return node


def review_graph() -> StateGraph:
    inner = StateGraph()
    inner.add_node("a", marked("review/a", lambda s: {"trail": [*s["trail"], "a"]}))
    inner.add_node("b", marked("review/b", lambda s: {"trail": [*s["trail"], "b"]}))
    inner.add_node("c", marked("review/c", lambda s: {"score": len(s["trail"])}))
    inner.add_edge(START, "a").add_edge("a", "b").add_edge("b", "c").add_edge("c", END)
    return inner


def outer_graph() -> StateGraph:
    graph = StateGraph()
    graph.add_node("prep", marked("prep", lambda s: {"doc": "text"}))
    graph.add_node("review", review_graph(),
                   input={"trail": "doc_trail", "marks": "marks"},
                   output={"score": "score", "trail": "trail"})
    graph.add_node("after", marked("after", lambda s: {"done": s["score"] * 10}))
    graph.add_edge(START, "prep").add_edge("prep", "review").add_edge("review", "after")
    graph.add_edge("after", END)
    return graph


def main(database: str, run_id: str, marks: str, result: str) -> int:
    checkpointer = SqliteCheckpointer(database)
    with outer_graph().compile(isolation="inline", checkpointer=checkpointer) as app:
        if checkpointer.get_run(run_id) is None:
            final = app.invoke({"marks": marks, "doc_trail": ["start"]},
                               config={"run_id": run_id})
        else:
            final = app.resume(run_id)
    Path(result).write_text(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
