"""The approval agent from Python: run it, answer every pending approval at once, resume.

    python examples/approval/approve.py

Each of the 5 branches pauses in its ``approve`` node; ``invoke`` returns
the state as of the pause with ``"__interrupt__"``, one ``Interrupt`` per
paused branch (ids ``write[0]/approve`` ... ``write[4]/approve``). This
script approves the replies to addresses it trusts and holds the others;
one ``resume`` answers them all, and only the paused nodes run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from isobranch import SqliteCheckpointer, YAMLEngine

AGENT = Path(__file__).with_name("approval.yaml")
TRUSTED = ("ada@example.com", "grace@example.com", "linus@example.com")


def main() -> int:
    # No path: the run is kept in memory, for as long as this checkpointer lives.
    with YAMLEngine(checkpointer=SqliteCheckpointer()).load_from_file(AGENT) as app:
        paused = app.invoke({}, config={"run_id": "approval-1"})
        answers = {}
        for question in paused["__interrupt__"]:
            answers[question.id] = "yes" if question.value["to"] in TRUSTED else "no"
            print(f"{question.id}: {answers[question.id]} ({question.value['to']})",
                  file=sys.stderr)
        final = app.resume("approval-1", answers=answers)
    print(json.dumps({"sent": [mail["to"] for mail in final["sent"]], "held": final["held"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
