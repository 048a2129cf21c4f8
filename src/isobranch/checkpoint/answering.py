"""Which pending interrupts a resume answers: checking ``answer=`` / ``answers=`` against them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import GraphError
from ..interrupts import Interrupt, pending_ids

# ``resume(run_id)`` without ``answer=``: nothing is answered (a breakpoint is continued).
NO_ANSWER: Any = object()


def answers_for(run_id: str, pending: list[Interrupt], answer: Any,
                answers: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{interrupt id: answer}`` for a resume of ``run_id``, which waits for ``pending``.

    ``answer`` answers the one pending ``interrupt()`` call, ``answers`` any
    of them by id; with neither, the run may only be stopped at a
    breakpoint. ``GraphError`` naming the ids at fault otherwise.
    """
    asked = [i for i in pending if i.breakpoint is None]
    where = f"run {run_id!r}"
    if answer is not NO_ANSWER and answers is not None:
        raise GraphError(f"{where}: resume() takes answer= or answers=, not both")
    if answer is not NO_ANSWER:
        if len(asked) != 1:
            waiting = (f"{len(asked)} interrupts ({pending_ids(asked)}); answer them with "
                       f"answers={{id: value}}" if asked else "no interrupt() answer")
            raise GraphError(f"{where}: answer= answers the one pending interrupt, but the "
                             f"run waits for {waiting}")
        return {asked[0].id: answer}
    if answers is not None:
        if not isinstance(answers, Mapping):
            raise GraphError(f"{where}: answers must be a dict {{interrupt id: value}}, got "
                             f"{type(answers).__name__}")
        known = {i.id for i in asked}
        unknown = [key for key in answers if key not in known]
        if unknown:
            raise GraphError(f"{where}: no pending interrupt has the id "
                             f"{', '.join(map(repr, unknown))}; pending: "
                             f"{pending_ids(asked) or 'none'}")
        return dict(answers)
    if asked:
        raise GraphError(f"{where} waits for an answer to {pending_ids(asked)}: "
                         f"resume(run_id, answer=...) or answers={{id: value}}")
    return {}
