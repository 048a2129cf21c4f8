"""The Python API: a graph built in code, with a Lua branch and a Python branch.

    python examples/python_api.py
"""

from isobranch import END, START, StateGraph
from isobranch.nodes import LuaNode


def fetch(state):
    return {"numbers": list(range(1, state.get("n", 10) + 1))}


def evens(state):
    return {"evens": [n for n in state["numbers"] if n % 2 == 0]}


def combine(state, parallel_results):
    by_branch = {r.branch: r for r in parallel_results}
    return {
        "sum_of_squares": by_branch["squares"].state["sum"],
        "evens": by_branch["evens"].state["evens"],
        "workers": sorted({str(r.worker) for r in parallel_results}),
    }


graph = StateGraph()
graph.add_node("fetch", fetch)
graph.add_node("squares", LuaNode("squares", """
    local total = 0
    for _, n in ipairs(state.numbers) do total = total + n * n end
    return {sum = total}
"""))
graph.add_node("evens", evens)
graph.add_fan_in_node("combine", combine)
graph.add_edge(START, "fetch")
graph.add_parallel_edge("fetch", "squares", fan_in="combine")
graph.add_parallel_edge("fetch", "evens", fan_in="combine")
graph.add_edge("combine", END)

if __name__ == "__main__":
    with graph.compile(isolation="thread", branch_timeout=5) as compiled:
        final = compiled.invoke({"n": 6})
        print(final["sum_of_squares"], final["evens"])
        for event in compiled.stream({"n": 3}):
            print(event["type"], event.get("node", ""))
