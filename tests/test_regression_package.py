"""The regression package: its public names in one place, and the records a case run logs."""

from __future__ import annotations

import logging
from pathlib import Path

import isobranch
import isobranch.regression as regression
from isobranch import YAMLEngine
from isobranch.regression import run_agent_case
from isobranch.regression.tracebacks import ENGINE_DIR, user_frames


def test_every_public_name_is_importable_from_the_package() -> None:
    for name in regression.__all__:
        assert getattr(regression, name) is not None, name
    assert {"load_case_file", "run_agent_case", "check_case", "subset_differences",
            "reproduce_command", "CaseContext", "CaseFailure", "FILE_ITEM_NAME"} <= set(regression.__all__)


def test_engine_frames_are_those_of_the_whole_package() -> None:
    """Frames of any isobranch module (not only of the regression package) are the engine's."""
    assert str(Path(isobranch.__file__).resolve().parent) == ENGINE_DIR
    text = (f'Traceback (most recent call last):\n  File "{ENGINE_DIR}/runner.py", line 1, in run\n'
            '    step()\n  File "/agents/node.py", line 2, in node\n    raise ValueError\n'
            'ValueError: bad')
    assert user_frames(text) == ['  File "/agents/node.py", line 2, in node', "    raise ValueError",
                                 "ValueError: bad"]


def test_a_case_run_logs_its_start_and_finish_at_debug(caplog) -> None:
    flow = {"nodes": [{"name": "only", "run": "-- lua\nreturn {done = true}"}]}
    with YAMLEngine().load_from_dict(flow) as graph, caplog.at_level(logging.DEBUG, logger="isobranch"):
        record = run_agent_case(graph, {"n": 1}, label="cases.agent.yaml::one")
    assert record.final == {"n": 1, "done": True}
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records
              if r.name == "isobranch.regression.running"]
    assert [(name, level) for name, level, _ in logged] == [
        ("isobranch.regression.running", logging.DEBUG)] * 2
    assert logged[0][2] == "cases.agent.yaml::one: started on input {'n': 1}"
    assert logged[1][2].startswith("cases.agent.yaml::one: succeeded in ")
    assert logged[1][2].endswith("route: only")
