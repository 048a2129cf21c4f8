"""isobranch: state-graph workflows whose parallel branches are isolated.

Every branch of a fan-out gets a deep copy of the state and its own fresh Lua
VM, and runs on a pluggable isolation backend (inline, thread, ...).
"""

from .branch import ParallelFlowResult
from .cache import CachePolicy
from .cache_store import SqliteCache
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
from .replay import Cassette, ReplayMode, Tape
from .retry import RetryPolicy
from .routes import END, START
from .run_history import RunState, StepRecord
from .stream_modes import StreamMode
from .yaml_engine import YAMLEngine

__version__ = "0.1.0"

__all__ = [
    "END",
    "START",
    "CachePolicy",
    "Cassette",
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
    "ReplayMode",
    "RetryPolicy",
    "RunState",
    "SqliteCache",
    "SqliteCheckpointer",
    "StateGraph",
    "StepRecord",
    "StreamMode",
    "Tape",
    "YAMLEngine",
    "available_backends",
    "interrupt",
    "register_backend",
    "unregister_backend",
]
