"""The command line of paused runs: exit code 3, ``resume --answer``, ``run --interactive``."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import plain_environment
from isobranch.cli import EXIT_INVALID, EXIT_OK, EXIT_PAUSED, main
from isobranch.cli_answers import resume_answers, typed_answer
from isobranch.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
APPROVAL = ROOT / "examples" / "approval" / "approval.yaml"

ASKING = """
    name: asking
    nodes:
      - name: prep
        run: |
          return {"n": 1}
      - name: approve
        run: |
          from isobranch import interrupt
          answer = interrupt({"question": "ok?", "n": state["n"]})
          return {"answer": answer}
    edges:
      - {from: __start__, to: prep}
      - {from: prep, to: approve}
"""


@pytest.fixture
def asking(tmp_path: Path) -> Path:
    path = tmp_path / "asking.yaml"
    path.write_text(textwrap.dedent(ASKING))
    return path


def _run(capfd, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_a_paused_run_exits_3_with_its_interrupts_on_stderr_then_resumes_with_an_answer(
        asking, capfd):
    database = asking.parent / "runs.db"
    code, out, err = _run(capfd, "run", asking, "--checkpoint", database, "--run-id", "r")
    assert (code, out) == (EXIT_PAUSED, "")
    assert EXIT_PAUSED == 3
    lines = err.splitlines()
    assert 'isobranch: interrupt: {"id": "approve", "value": {"question": "ok?", "n": 1}, ' \
           '"node": "approve", "branch": null}' in lines
    assert lines[-1] == (f"isobranch: run r paused; resume it with: isobranch resume {asking} r "
                         f"--checkpoint {database} --answer JSON")
    code, out, err = _run(capfd, "resume", asking, "r", "--checkpoint", database,
                          "--answer", '{"fine": true}')
    assert code == EXIT_OK, err
    assert json.loads(out) == {"n": 1, "answer": {"fine": True}}


def test_resume_answers_by_id_and_refuses_an_id_not_pending(asking, capfd):
    database = asking.parent / "runs.db"
    assert _run(capfd, "run", asking, "--checkpoint", database, "--run-id", "r")[0] == 3
    code, out, err = _run(capfd, "resume", asking, "r", "--checkpoint", database,
                          "--answer", 'nope="x"')
    assert (code, out) == (EXIT_INVALID, "")
    assert "'nope'" in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = _run(capfd, "resume", asking, "r", "--checkpoint", database,
                        "--answer", 'approve="yes"')
    assert (code, json.loads(out)["answer"]) == (EXIT_OK, "yes")


@pytest.mark.parametrize("mode", ["events", "updates", "values"])
def test_stream_ends_with_the_interrupt_event_as_json_in_every_mode(asking, capfd, mode):
    code, out, _ = _run(capfd, "run", asking, "--checkpoint", asking.parent / "runs.db",
                        f"--stream={mode}")
    assert code == EXIT_PAUSED
    last = json.loads(out.splitlines()[-1])
    assert last["type"] == "interrupt"
    assert last["interrupts"] == [{"id": "approve", "value": {"question": "ok?", "n": 1},
                                   "node": "approve", "branch": None}]


@pytest.mark.parametrize(("raw", "expected"), [
    (['"yes"'], {"answer": "yes"}),
    (["3"], {"answer": 3}),
    (['{"ok": true}'], {"answer": {"ok": True}}),
    (['a=1', 'b[2]/c="x=y"'], {"answers": {"a": 1, "b[2]/c": "x=y"}}),
    ([], {}),
])
def test_answer_options_become_resumes_keyword_arguments(raw, expected):
    assert resume_answers(raw) == expected


@pytest.mark.parametrize(("raw", "message"), [
    (["yes"], "--answer 'yes': invalid JSON"),
    (["approve=yes"], "--answer 'approve=yes': the answer to 'approve' is not JSON"),
    (["=1"], "--answer '=1': the interrupt id before '=' is empty"),
    (["a=1", "a=2"], "--answer 'a=2': interrupt 'a' is answered twice"),
    (['"x"', '"y"'], "--answer: give one answer"),
    (['"x"', "a=1"], "--answer: give one answer"),
])
def test_a_bad_answer_names_the_option_and_value(raw, message):
    with pytest.raises(InputError) as caught:
        resume_answers(raw)
    assert str(caught.value).startswith(message)


def test_an_answer_typed_at_the_prompt_is_json_if_it_parses_else_the_text():
    assert typed_answer("true\n") is True
    assert typed_answer('"yes"\n') == "yes"
    assert typed_answer("yes\n") == "yes"
    assert typed_answer("send it, please\r\n") == "send it, please"
    assert typed_answer("[1, 2]\n") == [1, 2]


class Terminal:
    """The controlling side of a pseudo-terminal a child runs in: read until a text shows."""

    def __init__(self, primary: int) -> None:
        self.primary = primary
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (found := re.search(pattern, self.seen)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} never showed; the terminal shows:\n"
                                     f"{self.seen}")
            ready, _, _ = select.select([self.primary], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.primary, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {pattern!r} showed:\n"
                                         f"{self.seen}")
                self.seen += chunk.decode("utf-8", "replace")
        self.seen = self.seen[found.end():]
        return found

    def type(self, line: str) -> None:
        os.write(self.primary, line.encode() + b"\n")


def test_run_interactive_asks_each_question_in_a_terminal_until_the_run_ends(tmp_path):
    """The approval example: 5 drafts, each paused for approval; 3 answered yes. Without
    --checkpoint the run is kept in memory: no database file is left behind."""
    primary, secondary = os.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "isobranch", "run", str(APPROVAL), "--interactive"],
        stdin=secondary, stderr=secondary, stdout=subprocess.PIPE, cwd=tmp_path,
        env=plain_environment(), close_fds=True)
    os.close(secondary)
    terminal = Terminal(primary)
    answers = {"0": "yes", "1": "no", "2": "true", "3": '"yes"', "4": "maybe later"}
    try:
        asked = []
        for _ in range(5):
            shown = terminal.read_until(r"write\[(\d)\]/approve asks: (\{.*\})\r?\n")
            assert json.loads(shown.group(2))["question"] == "send this reply?"
            terminal.read_until(r"answer for write\[\d\]/approve \(JSON, or plain text\): ")
            asked.append(shown.group(1))
            terminal.type(answers[shown.group(1)])
        out, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(primary)
    assert sorted(asked) == list(answers), "each branch asked once"
    assert child.returncode == EXIT_OK, terminal.seen
    final = json.loads(out)
    assert [mail["to"] for mail in final["sent"]] == [
        "ada@example.com", "grace@example.com", "linus@example.com"]
    assert final["held"] == ["alan@example.com", "barbara@example.com"]
    assert list(tmp_path.iterdir()) == []


def test_interactive_input_that_ends_leaves_the_run_paused_with_exit_3(tmp_path):
    database = tmp_path / "runs.db"
    done = subprocess.run(
        [sys.executable, "-m", "isobranch", "run", str(APPROVAL), "--interactive",
         "--checkpoint", str(database), "--run-id", "r"],
        input="yes\n", capture_output=True, text=True, cwd=tmp_path,
        env=plain_environment(), timeout=120)
    assert done.returncode == EXIT_PAUSED, done.stderr
    assert done.stdout == ""
    pending = [line for line in done.stderr.splitlines()
               if line.startswith("isobranch: interrupt: ")]
    assert len(pending) == 4, done.stderr  # one answered, four left
    assert "resume it with: isobranch resume" in done.stderr.splitlines()[-1]


def test_the_approval_example_runs_from_python(tmp_path):
    done = subprocess.run([sys.executable, str(APPROVAL.with_name("approve.py"))],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=plain_environment(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "sent": ["ada@example.com", "grace@example.com", "linus@example.com"],
        "held": ["alan@example.com", "barbara@example.com"]}
    assert sorted(done.stderr.split()[0::3]) == [f"write[{i}]/approve:" for i in range(5)]


def test_interactive_goes_on_past_a_breakpoint_with_enter(tmp_path):
    workflow = tmp_path / "breaks.yaml"
    workflow.write_text(textwrap.dedent("""
        interrupt_before: [b]
        nodes:
          - name: a
            run: |
              return {"n": 1}
          - name: b
            run: |
              return {"n": state["n"] + 1}
        edges:
          - {from: __start__, to: a}
          - {from: a, to: b}
    """))
    done = subprocess.run(
        [sys.executable, "-m", "isobranch", "run", str(workflow), "--interactive",
         "--checkpoint", str(tmp_path / "runs.db")],
        input="\n", capture_output=True, text=True, cwd=tmp_path, env=plain_environment(),
        timeout=120)
    assert done.returncode == EXIT_OK, done.stderr
    assert "isobranch: paused before node b; press Enter to go on: " in done.stderr
    assert json.loads(done.stdout) == {"n": 2}
