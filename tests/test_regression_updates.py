"""Planning an expectation update and rewriting a case file through ruamel.yaml's round trip.

The option itself (under -n 2, reports, exit codes) is tested through real
pytest runs in tests/test_plugin_update.py.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from isobranch.errors import GraphExecutionError
from isobranch.regression import (
    CaseRewriteError,
    RunRecord,
    UnrecordableValue,
    UpdateKind,
    UpdateLedger,
    file_digest,
    load_case_file,
    plan_update,
    rewrite_case_file,
    round_trip_problem,
)

CASES = """\
# A comment at the top stays.
agent: stats.yaml
cases:
  - name: first                     # a trailing comment stays
    input: {items: [1, 2]}
    expect:
      verdict: "small: total 3"     # quoted, and stays quoted
      stats: {total: 3, count: 2}   # flow style stays
      gone: 1
      branches: [a, {k: 1}]

  - name: second
    expect: record   # to be recorded
"""


def case_file(tmp_path: Path, text: str = CASES) -> Path:
    path = tmp_path / "test_x.agent.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def planned(path: Path, index: int, final: dict):
    case = load_case_file(path).cases[index]
    digest = file_digest(path.read_text(encoding="utf-8"))
    return plan_update(case, RunRecord(final=final), path=str(path), digest=digest)


FINAL = {"verdict": "big: total 30", "stats": {"total": 30, "count": 2, "mean": 15.0},
         "branches": ["a", {"k": 2, "extra": None}], "items": (10, 20)}


def test_an_update_changes_exactly_the_differing_values_as_deep_as_reported(tmp_path) -> None:
    update = planned(case_file(tmp_path), 0, FINAL)
    assert update.kind is UpdateKind.VALUES
    assert [(c.keys, c.value, c.delete) for c in update.changes] == [
        (("verdict",), "big: total 30", False),
        (("stats", "total"), 30, False),
        (("gone",), None, True),
        (("branches", 1, "k"), 2, False),
        (("branches", 1, "extra"), None, False),
    ]
    assert update.labels == ("verdict", "stats.total", "gone removed", "branches[1].k",
                             "branches[1].extra")


def test_rewriting_keeps_comments_order_quoting_and_flow_style(tmp_path) -> None:
    path = case_file(tmp_path)
    rewrite_case_file(path, [planned(path, 0, FINAL), planned(path, 1, FINAL)])
    assert path.read_text(encoding="utf-8") == textwrap.dedent("""\
        # A comment at the top stays.
        agent: stats.yaml
        cases:
          - name: first                     # a trailing comment stays
            input: {items: [1, 2]}
            expect:
              verdict: "big: total 30"      # quoted, and stays quoted
              stats: {total: 30, count: 2}  # flow style stays
              branches: [a, {k: 2, extra: null}]

          - name: second
            expect:          # to be recorded
              verdict: 'big: total 30'
              stats: {total: 30, count: 2, mean: 15.0}
              branches:
                - a
                - {k: 2, extra: null}
              items: [10, 20]
        """)
    # What was written reads back as the final state it records.
    cases = load_case_file(path).cases
    assert cases[1].expect == {**FINAL, "items": [10, 20]} and not cases[1].record


def test_a_case_that_expects_an_error_or_whose_agent_failed_is_not_updated(tmp_path) -> None:
    path = case_file(tmp_path, CASES + "  - name: third\n    expect_error: boom\n")
    assert planned(path, 2, FINAL) is None
    case = load_case_file(path).cases[0]
    failed = RunRecord(error=GraphExecutionError("node 'x' failed", node="x"))
    assert plan_update(case, failed, path=str(path), digest="") is None


def test_a_value_yaml_cannot_hold_is_refused_naming_its_key(tmp_path) -> None:
    path = case_file(tmp_path)
    with pytest.raises(UnrecordableValue, match=r"stats\.tags is a set"):
        planned(path, 1, {"stats": {"tags": {"a"}}})
    with pytest.raises(UnrecordableValue, match=r"verdict is nan"):
        planned(path, 0, {**FINAL, "verdict": float("nan")})


@pytest.mark.parametrize(("text", "why"), [
    ("agent: a.yaml\ncases:\n  - name: x\n    expect: {k: ~}\n", "'expect: {k: ~}' would become"),
    ("agent:   a.yaml\ncases: []\n", "line 1: 'agent:   a.yaml' would become 'agent: a.yaml'"),
])
def test_a_file_that_does_not_round_trip_is_refused_and_left_alone(tmp_path, text, why) -> None:
    assert why in round_trip_problem(text)
    path = tmp_path / "test_y.agent.yaml"
    path.write_text(text, encoding="utf-8")
    update = planned(case_file(tmp_path), 0, FINAL)
    moved = update.__class__(str(path), file_digest(text), 0, "x", update.kind, update.changes,
                             update.labels)
    with pytest.raises(CaseRewriteError, match="would not write it back unchanged"):
        rewrite_case_file(path, [moved])
    assert path.read_text(encoding="utf-8") == text


def test_a_file_changed_since_the_update_was_planned_is_left_alone(tmp_path) -> None:
    path = case_file(tmp_path)
    update = planned(path, 0, FINAL)
    path.write_text(CASES.replace("first", "renamed"), encoding="utf-8")
    with pytest.raises(CaseRewriteError, match="changed during the test session"):
        rewrite_case_file(path, [update])
    assert "renamed" in path.read_text(encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_the_rewritten_file_keeps_its_permissions(tmp_path) -> None:
    path = case_file(tmp_path)
    os.chmod(path, 0o640)
    rewrite_case_file(path, [planned(path, 0, FINAL)])
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_updates_travel_as_plain_data_and_group_by_file(tmp_path) -> None:
    path = case_file(tmp_path)
    worker = UpdateLedger()
    worker.add(planned(path, 1, FINAL))
    worker.add(planned(path, 0, FINAL))
    controller = UpdateLedger()
    controller.merge_plain(worker.to_plain())
    grouped = controller.by_file()
    assert list(grouped) == [str(path)]
    assert [u.name for u in grouped[str(path)]] == ["first", "second"]
    assert grouped[str(path)] == [planned(path, 0, FINAL), planned(path, 1, FINAL)]


def test_expect_record_is_valid_and_anything_else_but_a_mapping_is_not(tmp_path) -> None:
    path = case_file(tmp_path, CASES + "  - name: third\n    expect: recorded\n")
    cases = load_case_file(path).cases
    assert cases[1].record and not cases[1].problems
    assert cases[2].problems == ("'expect' must be a mapping (a subset of the final state) or "
                                 "'record', got str 'recorded'",)
