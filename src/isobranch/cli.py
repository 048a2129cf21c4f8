"""The ``isobranch`` command: run, resume, validate and draw YAML workflows; list runs.

The text of ``--help`` is written here as plain text (no reST markup);
it is not taken from docstrings.

Exit codes: 0 success, 1 the workflow failed while running (or ``graph``
could not render a picture: Graphviz missing or failing), 2 invalid input
(bad YAML, unknown node or backend, bad ``--input``, bad arguments), 130
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
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

from .branch import ParallelFlowResult
from .checkpoint.store import SqliteCheckpointer
from .cli_errors import command_message
from .cli_failures import FailedBranchWarnings
from .cli_logging import add_verbosity_option, log_to_stderr
from .cli_runs import runs_table
from .cli_stdout import PrivateStdout, stdout_to_stderr
from .errors import GraphError, GraphExecutionError, GraphvizError, InputError, StdoutClosed
from .fanout import print_branch_tracebacks
from .pictures import PictureFormat, picture, write_picture
from .progress import FanOutProgress, wants_progress
from .stream_modes import VALUES_EVENT_TYPES, StreamMode
from .yaml_engine import YAMLEngine

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
# The shell's codes for death by SIGINT and SIGPIPE (128 + signal number).
EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED = 130, 141
DESCRIPTION = "The isobranch command: run, resume, validate and draw YAML workflows; list runs."

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
    resume.set_defaults(handler=_resume)

    runs = commands.add_parser("runs", help="list the runs recorded in a checkpoint database")
    runs.add_argument("database", metavar="DB", help="checkpoint database file")
    runs.add_argument("--delete", metavar="ID", default=None,
                      help="delete the run ID and everything recorded for it, instead of "
                           "listing runs")
    runs.set_defaults(handler=_runs)

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
    for sub in (run, resume, validate, draw, runs):
        sub.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        add_verbosity_option(sub)
    for sub in (run, resume, validate):
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
        config = {"run_id": args.run_id} if args.run_id is not None else None
        recorded_in = graph.checkpointer.path if graph.checkpointer is not None else None
        return _follow(args, out, graph.stream(state, config, mode=_mode(args)),
                       recorded_in=recorded_in)


def _resume(args: argparse.Namespace, out: PrivateStdout) -> int:
    with _engine(args).load_from_file(args.file) as graph:
        log.debug("loaded %s (%d nodes)", args.file, len(graph.nodes))
        if graph.checkpointer is None:
            raise InputError(f"{args.file}: resume needs --checkpoint DB (the workflow has no "
                             f"settings.checkpoint)")
        if not graph.checkpointer.path.is_file():
            raise InputError(f"{graph.checkpointer.path}: no such checkpoint database")
        return _follow(args, out, graph.resume_stream(args.run_id, force=args.force,
                                                      mode=_mode(args)))


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
    return args.stream != StreamMode.VALUES or event["type"] in VALUES_EVENT_TYPES


def _follow(args: argparse.Namespace, out: PrivateStdout, events: Iterator[dict[str, Any]],
            *, recorded_in: Path | None = None) -> int:
    """Print the final state (or the ``--stream`` lines) of the run ``events`` describes.

    On stderr meanwhile: the run's id when it is recorded (``recorded_in``,
    once the database has it), a warning per failed branch, and the
    progress lines if wanted.
    """
    if wants_progress(args.progress, sys.stderr):  # on stderr only: stdout keeps just the JSON
        events = FanOutProgress(sys.stderr).follow(events)
    failures = FailedBranchWarnings(sys.stderr,
                                    from_branch_events=_mode(args) is StreamMode.UPDATES)
    final: dict = {}
    try:
        for event in events:
            if event["type"] == "run" and recorded_in is not None:
                print(f"isobranch: run {event['run_id']} (recorded in {recorded_in})",
                      file=sys.stderr, flush=True)
            failures.update(event)
            if args.stream:
                if _printed(args, event):
                    out.write_line(_json(_event_json(event), compact=True))
            elif event["type"] == "final":
                final = event["state"]
    except (StdoutClosed, KeyboardInterrupt):
        raise
    except Exception as exc:
        if args.stream:
            out.write_line(_json(_error_event(exc, _message(args, exc)), compact=True))
        raise
    finally:
        failures.close()
    if not args.stream:
        out.write_line(_json(final))
    return EXIT_OK


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
