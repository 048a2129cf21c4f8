"""isobranch: state-graph workflows whose parallel branches are isolated.

Every branch of a fan-out gets a deep copy of the state and its own fresh Lua
VM, and runs on a pluggable isolation backend (inline, thread, ...).
"""

from .branch import ParallelFlowResult
from .checkpoint import SqliteCheckpointer
from .compiled import CompiledGraph
from .errors import (
    GraphError,
    GraphExecutionError,
    IsobranchError,
    LuaMemoryError,
    LuaRuntimeError,
    LuaTimeoutError,
)
from .graph import StateGraph
from .interrupts import Interrupt, interrupt
from .isolation import (
    IsolationBackend,
    available_backends,
    register_backend,
    unregister_backend,
)
from .lua.runtime import LuaRuntime
from .retry import RetryPolicy
from .routes import END, START
from .run_history import RunState, StepRecord
from .stream_modes import StreamMode
from .yaml_engine import YAMLEngine

__version__ = "0.1.0"

__all__ = [
    "END",
    "START",
    "CompiledGraph",
    "GraphError",
    "GraphExecutionError",
    "Interrupt",
    "IsobranchError",
    "IsolationBackend",
    "LuaMemoryError",
    "LuaRuntime",
    "LuaRuntimeError",
    "LuaTimeoutError",
    "ParallelFlowResult",
    "RetryPolicy",
    "RunState",
    "SqliteCheckpointer",
    "StateGraph",
    "StepRecord",
    "StreamMode",
    "YAMLEngine",
    "available_backends",
    "interrupt",
    "register_backend",
    "unregister_backend",
]
