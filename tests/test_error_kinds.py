"""The engine's own failure kinds: members to compare against, plain strings in results."""

import pickle

from isobranch.branch import ParallelFlowResult
from isobranch.error_kinds import ErrorKind
from isobranch.errors import GraphExecutionError


def test_a_result_made_with_a_member_holds_the_plain_string():
    result = ParallelFlowResult(branch="b", success=False, error_type=ErrorKind.WORKER_CRASHED)
    assert type(result.error_type) is str and result.error_type == "WorkerCrashed"
    assert "ErrorKind" not in repr(result)
    assert type(pickle.loads(pickle.dumps(result)).error_type) is str


def test_an_execution_error_made_with_a_member_holds_the_plain_string():
    error = GraphExecutionError("stopped", error_type=ErrorKind.CANCELLED)
    assert type(error.error_type) is str and error.error_type == "Cancelled"


def test_members_equal_the_strings_results_carry():
    assert ErrorKind.BRANCH_TIMEOUT == "BranchTimeout"
    assert {"BranchMemoryError"} & {ErrorKind.BRANCH_MEMORY_ERROR}
