"""Agents written in the peer engine's YAML format load and run unchanged, on every backend.

The files under fixtures/peer_agents use only that format: ``state_schema:``
in its short form (``key: type``), ``run:`` nodes with a ``-- lua`` first
line, ``fan_in: true`` nodes whose Python reads results both as
``r["state"][key]`` and as ``r[key]`` / ``r.get(key)`` / ``key in r``,
and ``type: parallel`` edges.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from isobranch import GraphExecutionError, YAMLEngine

AGENTS = Path(__file__).parent / "fixtures" / "peer_agents"
# The peer format's keys: nothing isobranch-only (no settings, no language, no map edges).
PEER_TOP_LEVEL = {"name", "description", "variables", "state_schema", "nodes", "edges"}
PEER_NODE = {"name", "run", "fan_in"}
PEER_EDGE = {"from", "to", "type", "fan_in", "when"}

EXPECTED = {
    "parallel_globals.yaml": {"markers": ["from_a", "from_b"]},
    "parallel_functions.yaml": {"report": {"calc_result": 100, "calc_visible": False,
                                           "call_failed": True}},
    "parallel_state_copies.yaml": {"values_seen": [None, 1], "main_items": [1, 2, 3],
                                   "items": [1, 2, 3]},
    "sequential_lua.yaml": {"count": 3, "trail": ["a", "b"], "shared_seen": True},
    "no_leakage.yaml": {"leaks": {"var_leaked": False, "func_leaked": False,
                                  "table_leaked": False}},
}


def test_every_peer_agent_has_expectations():
    assert sorted(p.name for p in AGENTS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_peer_agent_uses_only_the_peer_format(name):
    document = yaml.safe_load((AGENTS / name).read_text(encoding="utf-8"))
    assert set(document) <= PEER_TOP_LEVEL and "state_schema" in document
    assert all(isinstance(kind, str) for kind in document["state_schema"].values())
    assert all(set(node) <= PEER_NODE for node in document["nodes"])
    assert all(set(edge) <= PEER_EDGE for edge in document["edges"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_peer_agent_runs_unchanged(name, isolation):
    with YAMLEngine(isolation=isolation).load_from_file(AGENTS / name) as graph:
        final = graph.invoke({})
    for key, value in EXPECTED[name].items():
        assert final[key] == value, key


def test_a_peer_agent_whose_fan_in_assertion_fails_reports_the_node():
    # The same file with its expectation reversed must fail, naming the fan-in node,
    # so the passing runs above prove the assertions in the file ran.
    document = yaml.safe_load((AGENTS / "no_leakage.yaml").read_text(encoding="utf-8"))
    fan_in = next(node for node in document["nodes"] if node["name"] == "fan_in")
    fan_in["run"] = fan_in["run"].replace("assert not b_result['state']['var_leaked']",
                                          "assert b_result['state']['var_leaked']")
    with YAMLEngine(isolation="inline").load_from_dict(document) as graph, \
            pytest.raises(GraphExecutionError) as caught:
        graph.invoke({})
    assert caught.value.node == "fan_in" and caught.value.error_type == "AssertionError"
