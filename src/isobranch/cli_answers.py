"""Answers to a paused run on the command line: ``--answer`` options and ``--interactive``.

``resume --answer JSON`` answers the run's one pending interrupt;
``--answer ID=JSON`` (repeatable) answers interrupt ``ID``. A value that
is not JSON is invalid input naming the option and the value: a string
needs its quotes (``--answer '"yes"'``), so a typo is never taken for an
answer.

``run --interactive`` asks each pending interrupt's question on the
terminal instead. There an answer is read as JSON when it parses as JSON
(``true``, ``3``, ``{"ok": 1}``, ``"yes"``) and as the plain text typed
otherwise (``yes``), since typing quotes at a prompt is easy to forget.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .errors import InputError
from .interrupts import Interrupt

ANSWER_OPTION = "--answer"


def resume_answers(raw_answers: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments of ``resume`` for the ``--answer`` values ``raw_answers``:
    ``{}``, ``{"answer": value}`` or ``{"answers": {id: value}}``.

    ``InputError`` naming the option and value for a value that is neither
    JSON nor ``ID=JSON``, and for plain answers given twice or mixed with
    ``ID=JSON`` ones.
    """
    plain: list[Any] = []
    by_id: dict[str, Any] = {}
    for raw in raw_answers:
        try:
            plain.append(json.loads(raw))
            continue
        except json.JSONDecodeError as exc:
            if "=" not in raw:
                raise InputError(f"{ANSWER_OPTION} {raw!r}: invalid JSON ({_reason(exc)}); give "
                                 f"a JSON value (a string in quotes: '\"yes\"') or ID=JSON"
                                 ) from exc
        interrupt_id, text = raw.split("=", 1)
        if not interrupt_id:
            raise InputError(f"{ANSWER_OPTION} {raw!r}: the interrupt id before '=' is empty")
        if interrupt_id in by_id:
            raise InputError(f"{ANSWER_OPTION} {raw!r}: interrupt {interrupt_id!r} is answered "
                             f"twice")
        try:
            by_id[interrupt_id] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{ANSWER_OPTION} {raw!r}: the answer to {interrupt_id!r} is not "
                             f"JSON ({_reason(exc)}); a string needs its quotes: "
                             f"{interrupt_id}='\"...\"'") from exc
    if plain and (by_id or len(plain) > 1):
        raise InputError(f"{ANSWER_OPTION}: give one answer for the run's one pending "
                         f"interrupt, or ID=JSON for each interrupt answered")
    if plain:
        return {"answer": plain[0]}
    return {"answers": by_id} if by_id else {}


def pause_lines(interrupts: Sequence[Interrupt], run_id: str | None, workflow: str,
                checkpoint: str | None, describe: Callable[[Interrupt], str]) -> list[str]:
    """What a paused run prints on stderr: a line per pending interrupt (``describe``
    writes it as JSON), then the command that resumes the run (``checkpoint``: the
    ``--checkpoint`` option given, if any)."""
    lines = [f"isobranch: interrupt: {describe(i)}" for i in interrupts]
    if run_id is None:
        return lines
    command = ["isobranch", "resume", workflow, run_id,
               *(("--checkpoint", checkpoint) if checkpoint else ())]
    asking = [i for i in interrupts if i.breakpoint is None]
    if len(asking) == 1:
        command += [ANSWER_OPTION, "JSON"]
    elif asking:
        command += [ANSWER_OPTION, "ID=JSON", "..."]
    lines.append(f"isobranch: run {run_id} paused; resume it with: {shlex.join(command)}")
    return lines


def typed_answer(line: str) -> Any:
    """An answer typed at the prompt: its JSON value if it is JSON, else the text itself."""
    text = line.rstrip("\r\n")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class Asked:
    """What the terminal answered: ``resume``'s keyword arguments, and whether input ended
    before every question was answered (the answers given are kept all the same)."""

    resume: dict[str, Any]
    input_ended: bool = False


def ask(interrupts: Sequence[Interrupt], terminal: TextIO, read_line: Callable[[], str],
        show: Callable[[Any], str]) -> Asked:
    """Ask each interrupt's question on ``terminal``, reading answers with ``read_line``.

    A breakpoint asks for nothing but Enter. ``show`` writes a value as JSON.
    """
    answers: dict[str, Any] = {}
    ended = False
    for interrupt in interrupts:
        if interrupt.breakpoint is not None:
            prompt = (f"isobranch: paused {interrupt.breakpoint} node {interrupt.node}; "
                      f"press Enter to go on: ")
        else:
            terminal.write(f"isobranch: {interrupt.id} asks: {show(interrupt.value)}\n")
            prompt = f"answer for {interrupt.id} (JSON, or plain text): "
        terminal.write(prompt)
        terminal.flush()
        line = read_line()
        if not line:  # end of input: nobody is there to answer the rest
            terminal.write("\n")
            ended = True
            break
        if interrupt.breakpoint is None:
            answers[interrupt.id] = typed_answer(line)
    return Asked({"answers": answers} if answers else {}, ended)


def _reason(exc: json.JSONDecodeError) -> str:
    return f"at line {exc.lineno} column {exc.colno}: {exc.msg}"
