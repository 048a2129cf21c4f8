"""Hand-written regression tests with the plugin's ``run_agent`` fixture.

``run_agent(path, input, **overrides)`` runs the agent YAML at ``path``
(relative to this file) on the compiled graph the plugin shares across the
session, and returns the final state.
"""

import pytest

from isobranch import GraphExecutionError


@pytest.mark.parametrize("items", [[1, 2, 3], [10, 20], [0]])
def test_total_is_the_sum_on_every_backend(run_agent, items):
    for isolation in ("inline", "thread", "process"):
        final = run_agent("stats.yaml", {"items": items}, isolation=isolation)
        assert final["stats"]["total"] == sum(items), isolation


def test_a_failing_branch_is_named(run_agent):
    with pytest.raises(GraphExecutionError) as failure:
        run_agent("stats.yaml", {"items": "x"})
    assert (failure.value.node, failure.value.branch) == ("python_stats", "python_stats")
