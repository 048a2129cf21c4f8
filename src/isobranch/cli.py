"""The ``isobranch`` command: run, resume, validate and draw YAML workflows; list runs.

The text of ``--help`` is written here as plain text (no reST markup);
it is not taken from docstrings.

Exit codes: 0 success, 1 the workflow failed while running (or ``graph``
could not render a picture: Graphviz missing or failing), 2 invalid input
(bad YAML, unknown node or backend, bad ``--input``, bad arguments), 3 the
run paused for answers (its pending interrupts are on stderr), 130
interrupted (Ctrl-C), 141 standard output closed by its reader (e.g.
``| head``). Every failure is one line on stderr; ``--debug`` adds the
traceback. Standard output carries only the command's own output: whatever
nodes print (Python, Lua, worker processes) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from .branch import ParallelFlowResult
from .checkpoint.store import RunStatus, SqliteCheckpointer
from .cli_answers import ANSWER_OPTION, ask, pause_lines, resume_answers
from .cli_errors import command_message
from .cli_failures import FailedBranchWarnings
from .cli_history import history_table, interrupt_json, state_json, step_json
from .cli_logging import add_verbosity_option, log_to_stderr
from .cli_runs import runs_table
from .cli_stdout import PrivateStdout, stdout_to_stderr
from .compiled import CompiledGraph
from .errors import GraphError, GraphExecutionError, GraphvizError, InputError, StdoutClosed
from .fanout import print_branch_tracebacks
from .interrupts import Interrupt
from .pictures import PictureFormat, picture, write_picture
from .progress import FanOutProgress, wants_progress
from .run_history import read_run, recorded_history
from .stream_modes import VALUES_EVENT_TYPES, StreamMode
from .yaml_engine import YAMLEngine

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
# The run paused (interrupt(), a breakpoint) and waits for a resume with answers.
EXIT_PAUSED = 3
# The shell's codes for death by SIGINT and SIGPIPE (128 + signal number).
EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED = 130, 141
DESCRIPTION = ("The isobranch command: run, resume, validate and draw YAML workflows; list, "
               "inspect and fork runs.")

log = logging.getLogger(__name__)


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``isobranch`` command with ``argv`` (default: ``sys.argv[1:]``); its exit code."""
    args = _parser().parse_args(_stream_default(sys.argv[1:] if argv is None else argv))
    try:
        with log_to_stderr(getattr(args, "verbose", 0)), stdout_to_stderr() as out:
            return args.handler(args, out)
    except (GraphError, InputError) as exc:
        return _fail(args, exc, EXIT_INVALID)
    except (GraphExecutionError, GraphvizError) as exc:
        return _fail(args, exc, EXIT_FAILED)
    except KeyboardInterrupt as exc:
        return _fail(args, exc, EXIT_INTERRUPTED, label="interrupted", message="")
    except StdoutClosed as exc:
        return _fail(args, exc, EXIT_STDOUT_CLOSED)
    except Exception as exc:  # an engine bug still gets one readable line
        return _fail(args, exc, EXIT_FAILED, label=f"internal error ({type(exc).__name__})")


def console() -> NoReturn:
    """The console script: ``main()``, then exit without waiting for abandoned threads.

    A branch the thread backend gave up on (interrupted, timed out) may still
    be stuck in a call; interpreter shutdown would wait for it, so the command
    would not end. When such a thread is left, the process exits at once
    (the graph, its pools and worker processes are closed by then).
    """
    code = main()
    if any(thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
           for thread in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing more can be said to a closed stream
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="isobranch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"isobranch {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a workflow and print the final state as JSON")
    run.add_argument("file", help="workflow YAML file")
    run.add_argument("--input", "-i", default=None,
                     help="initial state: a JSON object, or @path/to/file.json")
    run.add_argument("--checkpoint", metavar="DB", default=None,
                     help="record the run in this SQLite database so it can be resumed "
                          "(overrides settings.checkpoint)")
    run.add_argument("--run-id", default=None,
                     help="the id of the recorded run (default: a generated one, shown on "
                          "stderr)")
    run.set_defaults(handler=_run)

    resume = commands.add_parser("resume", help="finish a recorded run that was killed, "
                                                "interrupted or failed")
    resume.add_argument("file", help="workflow YAML file")
    resume.add_argument("run_id", metavar="RUN_ID", help="the id of the recorded run")
    resume.add_argument("--checkpoint", metavar="DB", default=None,
                        help="the database the run is recorded in (default: the workflow's "
                             "settings.checkpoint)")
    resume.add_argument("--force", action="store_true",
                        help="resume even though the workflow changed since the run started")
    resume.add_argument(ANSWER_OPTION, dest="answers", metavar="JSON|ID=JSON",
                        action="append", default=[],
                        help="answer the paused run's one pending interrupt with a JSON value, "
                             "or interrupt ID with ID=JSON (repeatable); a string needs its "
                             "quotes: --answer '\"yes\"'")
    resume.set_defaults(handler=_resume)

    runs = commands.add_parser("runs", help="list the runs recorded in a checkpoint database")
    runs.add_argument("database", metavar="DB", help="checkpoint database file")
    runs.add_argument("--delete", metavar="ID", default=None,
                      help="delete the run ID and everything recorded for it, instead of "
                           "listing runs")
    runs.set_defaults(handler=_runs)

    state = commands.add_parser("state", help="print a recorded run as it stands, as JSON: "
                                              "status, step, pending interrupts, state")
    state.add_argument("database", metavar="DB", help="checkpoint database file")
    state.add_argument("run_id", metavar="RUN_ID", help="the id of the recorded run")
    state.add_argument("--workflow", metavar="FILE", default=None,
                       help="the run's workflow YAML file: also work out the nodes a resume "
                            "runs next (without it, \"next\" is null unless the run "
                            "succeeded)")
    state.set_defaults(handler=_state)

    history = commands.add_parser("history", help="list the recorded steps of a run, oldest "
                                                  "first")
    history.add_argument("database", metavar="DB", help="checkpoint database file")
    history.add_argument("run_id", metavar="RUN_ID", help="the id of the recorded run")
    history.add_argument("--json", action="store_true",
                         help="one JSON object per step, with the state after it, instead of "
                              "the table")
    history.set_defaults(handler=_history)

    fork = commands.add_parser("fork", help="record a new run that starts from the state after "
                                            "a step of a recorded run; resume it to run it")
    fork.add_argument("file", help="workflow YAML file")
    fork.add_argument("run_id", metavar="RUN_ID", help="the id of the recorded run")
    fork.add_argument("step", metavar="STEP", type=int,
                      help="the step to start from, as isobranch history numbers them "
                           "(0: the run's input)")
    fork.add_argument("--checkpoint", metavar="DB", default=None,
                      help="the database the run is recorded in (default: the workflow's "
                           "settings.checkpoint)")
    fork.add_argument("--update", metavar="JSON", default=None,
                      help="a JSON object merged into that step's state as if its node had "
                           "returned it (reducers apply)")
    fork.add_argument("--run-id", dest="new_run_id", metavar="ID", default=None,
                      help="the new run's id (default: a generated one)")
    fork.set_defaults(handler=_fork)

    validate = commands.add_parser("validate", help="report every problem in a workflow")
    validate.add_argument("file")
    validate.set_defaults(handler=_validate)

    draw = commands.add_parser("graph", help="draw the workflow: Mermaid or DOT text, or an "
                                              "SVG or PNG picture (through Graphviz's dot)")
    draw.add_argument("file")
    draw.add_argument("--format", "-f", default=PictureFormat.MERMAID.value,
                      choices=[fmt.value for fmt in PictureFormat],
                      help="what to draw (default: mermaid); svg and png need Graphviz's dot "
                           "program on the PATH")
    draw.add_argument("--output", "-o", metavar="PATH", default=None,
                      help="write the drawing to PATH (replaced whole, or not at all) instead "
                           "of standard output; png needs it when standard output is a "
                           "terminal")
    draw.set_defaults(handler=_graph)

    for sub in (run, resume):  # the commands that run a workflow
        sub.add_argument("--isolation", default=None,
                         help="isolation backend (overrides settings.parallel.isolation)")
        sub.add_argument("--stream", metavar="MODE", default=None,
                         choices=[mode.value for mode in StreamMode],
                         help="print one JSON event per line as the run goes: --stream or "
                              "--stream=events (every event, with states), --stream=updates "
                              "(small events: each node's update, each fan-out's counts), "
                              "--stream=values (the state after each step)")
        sub.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="a live progress line per running fan-out on stderr "
                              "(default: when stderr is a terminal)")
        sub.add_argument("--interactive", action="store_true",
                         help="when the run pauses, ask each interrupt's question on the "
                              "terminal (an answer is JSON if it parses, else plain text) and "
                              "resume until the run ends; without a checkpoint database the "
                              "run is kept in memory")
    for sub in (run, resume, validate, draw, runs, state, history, fork):
        sub.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        add_verbosity_option(sub)
    for sub in (run, resume, validate, state, fork):
        sub.add_argument("--lua-only", action="store_true",
                         help="for workflows you do not trust: refuse any Python node or "
                              "condition and any file outside the workflow's directory, so "
                              "only sandboxed Lua runs")
    return parser


def _version() -> str:
    try:
        return metadata.version("isobranch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _engine(args: argparse.Namespace) -> YAMLEngine:
    checkpointer = SqliteCheckpointer(args.checkpoint) if args.checkpoint else None
    return YAMLEngine(isolation=args.isolation, allow_python=not args.lua_only,
                      checkpointer=checkpointer)


def _run(args: argparse.Namespace, out: PrivateStdout) -> int:
    state = _read_input(args.input)
    with _engine(args).load_from_file(args.file) as graph:
        log.debug("loaded %s (%d nodes)", args.file, len(graph.nodes))
        if args.run_id is not None and graph.checkpointer is None:
            raise InputError(f"{args.file}: --run-id needs --checkpoint DB (the workflow has "
                             f"no settings.checkpoint)")
        recorded_in = graph.checkpointer.path if graph.checkpointer is not None else None
        if args.interactive and graph.checkpointer is None:
            # Answering needs the run recorded; in memory, it lasts as long as the command.
            graph.checkpointer, graph.owns_checkpointer = SqliteCheckpointer(), True
        config = {"run_id": args.run_id} if args.run_id is not None else None
        ended = _follow(args, out, graph.stream(state, config, mode=_mode(args)),
                        recorded_in=recorded_in)
        return _finish(args, out, graph, ended)


def _resume(args: argparse.Namespace, out: PrivateStdout) -> int:
    with _engine(args).load_from_file(args.file) as graph:
        log.debug("loaded %s (%d nodes)", args.file, len(graph.nodes))
        if graph.checkpointer is None:
            raise InputError(f"{args.file}: resume needs --checkpoint DB (the workflow has no "
                             f"settings.checkpoint)")
        if not graph.checkpointer.path.is_file():
            raise InputError(f"{graph.checkpointer.path}: no such checkpoint database")
        answers = resume_answers(args.answers)
        ended = _follow(args, out, graph.resume_stream(args.run_id, force=args.force,
                                                       mode=_mode(args), **answers))
        return _finish(args, out, graph, ended)


def _runs(args: argparse.Namespace, out: PrivateStdout) -> int:
    path = Path(args.database)
    if not path.is_file():
        raise InputError(f"{args.database}: no such checkpoint database")
    checkpointer = SqliteCheckpointer(path)
    try:
        if args.delete is None:
            out.write_line(runs_table(checkpointer.list_runs()))
        elif checkpointer.delete_run(args.delete):
            out.write_line(f"deleted run {args.delete}")
        else:
            raise InputError(f"{args.database}: there is no run {args.delete!r}")
    finally:
        checkpointer.close()
    return EXIT_OK


def _database(database: str) -> SqliteCheckpointer:
    """The checkpoint database ``database`` names; ``InputError`` if there is no such file."""
    if not Path(database).is_file():
        raise InputError(f"{database}: no such checkpoint database")
    return SqliteCheckpointer(database)


def _state(args: argparse.Namespace, out: PrivateStdout) -> int:
    checkpointer = _database(args.database)
    try:
        if args.workflow is None:
            run = read_run(checkpointer, args.run_id)
            # A run that succeeded runs nothing next; otherwise only the workflow can say.
            shown = state_json(args.run_id, status=str(run.status), step=run.step,
                               next_nodes=() if run.status == RunStatus.SUCCEEDED else None,
                               interrupts=run.interrupts, values=run.values)
        else:
            engine = YAMLEngine(allow_python=not args.lua_only, checkpointer=checkpointer)
            with engine.load_from_file(args.workflow) as graph:
                now = graph.get_state(args.run_id)
            shown = state_json(args.run_id, status=str(now.status), step=now.step,
                               next_nodes=now.next, interrupts=now.interrupts,
                               values=now.values)
    finally:
        checkpointer.close()
    out.write_line(_json(shown))
    return EXIT_OK


def _history(args: argparse.Namespace, out: PrivateStdout) -> int:
    checkpointer = _database(args.database)
    try:
        records = recorded_history(checkpointer, args.run_id)
    finally:
        checkpointer.close()
    if args.json:
        for record in records:
            out.write_line(_json(step_json(record), compact=True))
    else:
        out.write_line(history_table(records))
    return EXIT_OK


def _fork(args: argparse.Namespace, out: PrivateStdout) -> int:
    update = _json_option("--update", args.update) if args.update is not None else None
    if update is not None and not isinstance(update, dict):
        raise InputError(f"--update: must be a JSON object, got {type(update).__name__}")
    checkpointer = SqliteCheckpointer(args.checkpoint) if args.checkpoint else None
    engine = YAMLEngine(allow_python=not args.lua_only, checkpointer=checkpointer)
    with engine.load_from_file(args.file) as graph:
        if graph.checkpointer is None:
            raise InputError(f"{args.file}: fork needs --checkpoint DB (the workflow has no "
                             f"settings.checkpoint)")
        if not graph.checkpointer.path.is_file():
            raise InputError(f"{graph.checkpointer.path}: no such checkpoint database")
        new_id = graph.fork(args.run_id, args.step, update, args.new_run_id)
    resume = shlex.join(["isobranch", "resume", args.file, new_id,
                         *(("--checkpoint", args.checkpoint) if args.checkpoint else ())])
    print(f"isobranch: forked run {args.run_id} at step {args.step} as run {new_id}; "
          f"continue it with: {resume}", file=sys.stderr, flush=True)
    out.write_line(new_id)
    return EXIT_OK


def _json_option(flag: str, raw: str) -> Any:
    """The JSON value of option ``flag``; ``InputError`` naming the flag and value if invalid."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} {raw!r}: invalid JSON at line {exc.lineno} column "
                         f"{exc.colno}: {exc.msg}") from exc


def _stream_default(argv: Sequence[str]) -> list[str]:
    """``argv`` with a bare ``--stream`` spelled ``--stream=events``: a mode is only ever
    given after ``=``, so ``--stream FILE`` keeps reading FILE as the workflow."""
    return [f"--stream={StreamMode.EVENTS.value}" if arg == "--stream" else arg
            for arg in argv]


def _mode(args: argparse.Namespace) -> StreamMode:
    """The mode the command streams the run in: ``--stream=updates``'s, else events
    (the final state, the progress lines and the warnings are read from them);
    ``--stream=values`` prints only the events of that mode, which events mode has too."""
    return StreamMode.UPDATES if args.stream == StreamMode.UPDATES else StreamMode.EVENTS


def _printed(args: argparse.Namespace, event: dict[str, Any]) -> bool:
    """Whether ``--stream`` prints ``event``."""
    # A pause ends a stream in every mode, as ``final`` does.
    return (args.stream != StreamMode.VALUES or event["type"] in VALUES_EVENT_TYPES
            or event["type"] == "interrupt")


@dataclass
class _Ended:
    """How the events of one run (or resume) ended: ``interrupts`` if it paused (None if it
    finished), with its ``final`` state."""

    run_id: str | None = None
    interrupts: list[Interrupt] | None = None
    final: dict = field(default_factory=dict)


def _finish(args: argparse.Namespace, out: PrivateStdout, graph: CompiledGraph,
            ended: _Ended) -> int:
    """Print the final state of a run that finished; with ``--interactive``, first answer
    each pause on the terminal and resume, until the run ends or input does (what was
    answered by then is resumed with). A run left paused prints its interrupts on stderr:
    ``EXIT_PAUSED``."""
    while (ended.interrupts is not None and ended.run_id is not None
           and getattr(args, "interactive", False)):
        asked = ask(ended.interrupts, sys.stderr, sys.stdin.readline, _compact_json)
        if asked.input_ended and not asked.resume:
            break
        # Answers typed before input ended are not lost: the run takes them, then stops.
        ended = _follow(args, out, graph.resume_stream(ended.run_id, mode=_mode(args),
                                                       **asked.resume))
        if asked.input_ended:
            break
    if ended.interrupts is not None:
        _report_pause(args, ended)
        return EXIT_PAUSED
    if not args.stream:
        out.write_line(_json(ended.final))
    return EXIT_OK


def _report_pause(args: argparse.Namespace, ended: _Ended) -> None:
    """The pending interrupts of a paused run on stderr, then how to resume it."""
    assert ended.interrupts is not None
    for line in pause_lines(ended.interrupts, ended.run_id, args.file, args.checkpoint,
                            lambda interrupt: _compact_json(interrupt_json(interrupt))):
        print(line, file=sys.stderr)
    sys.stderr.flush()


def _compact_json(value: Any) -> str:
    return _json(value, compact=True)


def _follow(args: argparse.Namespace, out: PrivateStdout, events: Iterator[dict[str, Any]],
            *, recorded_in: Path | None = None) -> _Ended:
    """Follow the run ``events`` describe, printing the ``--stream`` lines; how it ended.

    On stderr meanwhile: the run's id when it is recorded (``recorded_in``,
    once the database has it), a warning per failed branch, and the
    progress lines if wanted.
    """
    if wants_progress(args.progress, sys.stderr):  # on stderr only: stdout keeps just the JSON
        events = FanOutProgress(sys.stderr).follow(events)
    failures = FailedBranchWarnings(sys.stderr,
                                    from_branch_events=_mode(args) is StreamMode.UPDATES)
    ended = _Ended()
    try:
        for event in events:
            if event["type"] == "run":
                ended.run_id = event["run_id"]
                if recorded_in is not None:
                    print(f"isobranch: run {event['run_id']} (recorded in {recorded_in})",
                          file=sys.stderr, flush=True)
            failures.update(event)
            if args.stream and _printed(args, event):
                out.write_line(_json(_event_json(event), compact=True))
            if event["type"] == "final":
                ended.final = event.get("state", {})
            elif event["type"] == "interrupt":
                ended.interrupts = list(event["interrupts"])
    except (StdoutClosed, KeyboardInterrupt):
        raise
    except Exception as exc:
        if args.stream:
            out.write_line(_json(_error_event(exc, _message(args, exc)), compact=True))
        raise
    finally:
        failures.close()
    return ended


def _message(args: argparse.Namespace, exc: BaseException) -> str:
    """``exc``'s message as the command shows it: in its own words where it has them."""
    file = getattr(args, "file", None)
    worded = command_message(exc, file, getattr(args, "checkpoint", None)) if file else None
    return worded if worded is not None else str(exc)


def _error_event(exc: Exception, message: str) -> dict[str, Any]:
    """The last ``--stream`` line of a failed run: where it failed and why."""
    return {"type": "error", "node": getattr(exc, "node", None),
            "branch": getattr(exc, "branch", None),
            "error_type": getattr(exc, "error_type", None) or type(exc).__name__,
            "message": message}


def _validate(args: argparse.Namespace, out: PrivateStdout) -> int:
    problems = YAMLEngine(allow_python=not args.lua_only).validate_file(args.file)
    log.debug("validated %s (%d problems)", args.file, len(problems))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    out.write_line(f"{args.file}: ok")
    return EXIT_OK


def _graph(args: argparse.Namespace, out: PrivateStdout) -> int:
    fmt = PictureFormat(args.format)
    if fmt.is_binary and args.output is None and out.isatty():
        raise InputError(f"--format {fmt.value} is binary: write it to a file with -o PATH, "
                         f"or redirect standard output")
    with YAMLEngine().load_from_file(args.file) as graph:
        log.debug("loaded %s (%d nodes)", args.file, len(graph.nodes))
        data = picture(graph, fmt)
    if args.output is None:
        out.write_bytes(data)
        return EXIT_OK
    try:
        write_picture(Path(args.output), data)
    except OSError as exc:
        raise InputError(f"-o {args.output}: cannot write: {exc.strerror or exc}") from exc
    log.debug("wrote %s (%d bytes)", args.output, len(data))
    return EXIT_OK


def _read_input(raw: str | None) -> dict:
    if raw is None:
        return {}
    where = "--input"
    if raw.startswith("@"):
        path = Path(raw[1:])
        where = f"--input file {str(path)!r}"
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: cannot read: {exc}") from exc
    try:
        state = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg}") from exc
    if not isinstance(state, dict):
        raise InputError(f"{where}: must be a JSON object, got {type(state).__name__}")
    return state


def _event_json(event: dict[str, Any]) -> dict[str, Any]:
    if event["type"] == "parallel" and "branches" in event:  # events mode: the results
        return {**event, "branches": [r.to_dict() for r in event["branches"]]}
    return event


def _json_default(value: Any) -> Any:
    if isinstance(value, ParallelFlowResult):
        return value.to_dict()
    if isinstance(value, Interrupt):
        return interrupt_json(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def _json(value: Any, *, compact: bool = False) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False,
                      indent=None if compact else 2, sort_keys=not compact)


def _fail(args: argparse.Namespace, exc: BaseException, code: int, label: str = "error",
          message: str | None = None) -> int:
    if getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
        print_branch_tracebacks(exc, sys.stderr)
    if message is None:
        message = _message(args, exc)
        if isinstance(exc, GraphError) and len(exc.problems) > 1:
            message = "; ".join(exc.problems)
            if exc.source:
                message = f"{exc.source}: {message}"
        message = " ".join(message.split("\n"))
    print(f"isobranch: {label}: {message}" if message else f"isobranch: {label}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    console()
