"""Recorded nodes (``replay=True``) and tapes, without the pytest plugin."""

from __future__ import annotations

import json

import pytest

from conftest import BACKENDS
from isobranch import (
    END,
    START,
    Cassette,
    GraphError,
    GraphExecutionError,
    ReplayMode,
    StateGraph,
    Tape,
    YAMLEngine,
)
from isobranch.node_memo import call_key


def _model(state):
    return {"answer": f"live answer to {state['question']}"}


def _must_not_run(state):
    raise AssertionError("a replayed node ran")


def _one_node(fn) -> StateGraph:
    graph = StateGraph()
    graph.add_node("model", fn, replay=True)
    graph.add_edge(START, "model").add_edge("model", END)
    return graph


def test_a_recorded_node_returns_its_recording_and_never_runs():
    tape = Tape(ReplayMode.REPLAY, {"model": [{"answer": "recorded"}]})
    with _one_node(_must_not_run).compile() as app:
        events = [e for e in app.stream({"question": "q"}, config={"replay": tape})
                  if e["type"] == "node"]
    assert events[0]["state"]["answer"] == "recorded" and events[0]["replayed"] is True


def test_record_mode_runs_the_node_and_keeps_each_call_in_order():
    graph = StateGraph()
    graph.add_node("model", _model, replay=True)
    graph.add_node("again", lambda state: {"question": state["question"] + "!", "n": state.get(
        "n", 0) + 1})
    graph.add_edge(START, "model").add_edge("model", "again")
    graph.add_conditional_edges("again", lambda state: "model" if state["n"] < 2 else END)
    tape = Tape(ReplayMode.RECORD)
    with graph.compile() as app:
        final = app.invoke({"question": "q"}, config={"replay": tape})
    assert final["answer"] == "live answer to q!"
    assert tape.new == {"model": [{"answer": "live answer to q"},
                                  {"answer": "live answer to q!"}]}


def test_a_missing_recording_fails_naming_the_node_and_how_to_record_it():
    tape = Tape(ReplayMode.REPLAY, {"model": [{"answer": "only one"}]}, source="cassette.json",
                hint="record it with: pytest --isobranch-record")
    graph = StateGraph()
    graph.add_node("model", _must_not_run, replay=True)
    graph.add_node("again", lambda state: {"n": state.get("n", 0) + 1})
    graph.add_edge(START, "model").add_edge("model", "again")
    graph.add_conditional_edges("again", lambda state: "model" if state["n"] < 2 else END)
    with graph.compile() as app, pytest.raises(GraphExecutionError) as caught:
        app.invoke({}, config={"replay": tape})
    message = str(caught.value)
    assert "node 'model'" in message and "call 2" in message
    assert "cassette.json" in message and "pytest --isobranch-record" in message
    assert caught.value.error_type == "MissingRecording"


def test_without_a_tape_a_recorded_node_runs_live():
    with _one_node(_model).compile() as app:
        assert app.invoke({"question": "q"})["answer"] == "live answer to q"


def test_config_replay_must_be_a_tape():
    with _one_node(_model).compile() as app, pytest.raises(GraphError, match="must be a Tape"):
        app.invoke({}, config={"replay": {"model": []}})


def _map_graph(call) -> StateGraph:
    graph = StateGraph()
    graph.add_node("split", lambda state: None)
    graph.add_node("call", call, replay=True)
    graph.add_node("post", lambda state: {"shout": state["answer"].upper()})
    graph.add_fan_in_node("join", lambda state, results: {
        "answers": [r.state["shout"] for r in results]})
    graph.add_edge(START, "split")
    graph.add_map_edge("split", "call", over="questions", item_key="question", fan_in="join")
    graph.add_edge("call", "post").add_edge("post", "join").add_edge("join", END)
    return graph


@pytest.mark.parametrize("isolation", BACKENDS)
def test_map_branches_record_and_replay_on_every_backend(isolation, tmp_path):
    questions = {"questions": ["a", "b", "c"]}
    record = Tape(ReplayMode.RECORD)
    with _map_graph(_model).compile(isolation=isolation, max_workers=2) as app:
        live = app.invoke(questions, config={"replay": record})
    assert record.new == {f"call[{i}]": [{"answer": f"live answer to {q}"}]
                          for i, q in enumerate("abc")}
    cassette = Cassette(tmp_path / "calls.cassette.json")
    cassette.keep("three", record)
    cassette.save()
    replay = Cassette(tmp_path / "calls.cassette.json").tape("three")
    with _map_graph(_must_not_run).compile(isolation=isolation, max_workers=2) as app:
        assert app.invoke(questions, config={"replay": replay}) == live


def test_a_recorded_node_inside_a_subgraph_is_keyed_by_its_path():
    inner = _one_node(_model)
    graph = StateGraph()
    graph.add_node("ask", inner)
    graph.add_edge(START, "ask").add_edge("ask", END)
    tape = Tape(ReplayMode.RECORD)
    with graph.compile() as app:
        app.invoke({"question": "q"}, config={"replay": tape})
    assert tape.new == {"ask/model": [{"answer": "live answer to q"}]}


@pytest.mark.parametrize("path, branch, key", [
    ("model", None, "model"), ("review/model", None, "review/model"),
    ("call", "call[3]", "call[3]"), ("post", "call[3]", "call[3]/post"),
    ("review[3]/score", "review[3]", "review[3]/score"),
    ("score", "outer[1]/score[3]", "outer[1]/score[3]"), ("b", "a", "a/b")])
def test_call_keys_name_the_branch(path, branch, key):
    assert call_key(path, branch) == key


def test_yaml_replay_true(tmp_path):
    document = {"nodes": [{"name": "model", "replay": True, "run": "raise RuntimeError('ran')"}]}
    tape = Tape(ReplayMode.REPLAY, {"model": [{"answer": 42}]})
    with YAMLEngine().load_from_dict(document) as app:
        assert app.invoke({}, config={"replay": tape}) == {"answer": 42}
    with pytest.raises(GraphError, match="node 'model': replay: must be true or false"):
        YAMLEngine().load_from_dict({"nodes": [{"name": "model", "replay": "yes",
                                                "run": "return {}"}]})


def test_a_cassette_that_is_not_one_is_an_error_naming_it(tmp_path):
    path = tmp_path / "x.cassette.json"
    path.write_text("{not json")
    with pytest.raises(GraphError, match=f"cassette '{path}' is not JSON"):
        Cassette(path)
    path.write_text(json.dumps({"cases": {}}))
    with pytest.raises(GraphError, match="is not an isobranch cassette"):
        Cassette(path)


def test_an_update_the_codec_cannot_write_fails_recording_naming_the_node():
    with _one_node(lambda state: {"answer": object()}).compile() as app, \
            pytest.raises(GraphExecutionError, match="node 'model': what it returned cannot be "
                                                     r"recorded: update\['answer'\]"):
        app.invoke({}, config={"replay": Tape(ReplayMode.RECORD)})
