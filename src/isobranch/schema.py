"""The state schema: declared types and reducers of state keys, and the one place updates merge.

A schema comes from a ``TypedDict`` (``Annotated[T, reducer]`` fields), a
dict ``{key: reducer | type}``, or YAML ``state_schema:``. Every node update
goes through ``StateSchema.apply``: a key with a reducer combines with its
value, other keys are replaced, and declared types are checked, all or
nothing. At a fan-in, ``combine`` folds every successful branch's writes to
reducer keys into the state, in branch (item) order, before the fan-in node
runs. A schema that cannot be honoured is a ``GraphError`` when it is built.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import statetypes
from .errors import GraphError, ReducerError, StateSchemaError, UncheckableType
from .keys import unknown
from .reducers import BUILT_IN, MISSING, Accumulator, CallableReducer, Reducer, built_in
from .statetypes import TypeCheck, describe

if TYPE_CHECKING:
    from .branch import ParallelFlowResult
    from .context import ExecutionContext

# The keys of a long-form field: ``results: {type: list, reducer: append}``.
FIELD_KEYS: frozenset[str] = frozenset({"type", "reducer", "description"})
# error_type of a failed update.
STATE_TYPE_ERROR = "StateTypeError"
REDUCER_ERROR = "ReducerError"


@dataclass(frozen=True)
class Field:
    """One declared key: its type check (None: any value) and its reducer (None: replace)."""

    key: str
    check: TypeCheck | None = None
    reducer: Reducer | None = None

    @property
    def empty_table_is_list(self) -> bool:
        """A Lua node's empty table (``{}`` to Python) means an empty list for this key."""
        if self.check is not None:
            return self.check.may_hold(list) and not self.check.may_hold(dict)
        return self.reducer is not None and self.reducer.produces is list


class StateSchema:
    """Declared fields by key; ``apply`` and ``combine`` merge updates under them."""

    def __init__(self, fields: Iterable[Field] = ()) -> None:
        self.fields: dict[str, Field] = {f.key: f for f in fields}
        self.reducers: dict[str, Reducer] = {k: f.reducer for k, f in self.fields.items()
                                             if f.reducer is not None}

    def __bool__(self) -> bool:
        return bool(self.fields)

    def __repr__(self) -> str:
        return f"StateSchema({', '.join(self.describe())})"

    def describe(self) -> list[str]:
        """``key: type, reducer`` for each field, in declaration order."""
        return [f"{f.key}: {f.check.label if f.check else 'any'}"
                + (f" (reducer {f.reducer.name})" if f.reducer else "")
                for f in self.fields.values()]

    # -- building ---------------------------------------------------------------

    @classmethod
    def from_python(cls, schema: Any) -> StateSchema:
        """A schema from ``StateGraph(state_schema)``: None, a TypedDict, a dict, a StateSchema."""
        if schema is None:
            return cls()
        if isinstance(schema, StateSchema):
            return schema
        problems: list[str] = []
        if isinstance(schema, type) and typing.is_typeddict(schema):
            try:
                hints = typing.get_type_hints(schema, include_extras=True)
            except Exception as exc:  # an unresolvable forward reference, say
                raise GraphError(f"state_schema {schema.__name__}: cannot read its annotations: "
                                 f"{type(exc).__name__}: {exc}") from exc
            fields = [_python_field(key, hint, f"state_schema {schema.__name__}.{key}", problems,
                                    annotation=True)
                      for key, hint in hints.items()]
        elif isinstance(schema, Mapping):
            fields = [_python_field(key, value, f"state_schema[{key!r}]", problems)
                      for key, value in schema.items()]
        else:
            raise GraphError(f"state_schema must be a TypedDict class or a dict {{key: reducer}}, "
                             f"got {_what(schema)} (isobranch states are dicts)")
        if problems:
            raise GraphError(problems=problems)
        return cls(f for f in fields if f is not None)

    @classmethod
    def from_yaml(cls, document: Any, problems: list[str], where: str = "state_schema"
                  ) -> StateSchema:
        """A schema from YAML ``state_schema:`` (``key: type`` or ``key: {type, reducer}``).

        Every problem is appended to ``problems``, naming ``state_schema.<key>``.
        """
        if document is None:
            return cls()
        if not isinstance(document, Mapping):
            problems.append(f"{where}: must be a mapping of state keys, got "
                            f"{type(document).__name__}")
            return cls()
        fields = []
        for key, spec in document.items():
            path = f"{where}.{key}"
            if not isinstance(key, str) or not key:
                problems.append(f"{where}: a state key must be a non-empty string, got {key!r}")
                continue
            if isinstance(spec, Mapping):
                for extra in sorted(set(spec) - FIELD_KEYS, key=str):
                    problems.append(unknown(f"{path}.{extra}: unknown key", extra, FIELD_KEYS))
                if "type" not in spec and "reducer" not in spec:
                    problems.append(f"{path}: give a 'type', a 'reducer' or both")
                    continue
                type_name, reducer_name = spec.get("type", "any"), spec.get("reducer")
            else:
                type_name, reducer_name = spec, None
            check = _named_type(type_name, path, problems)
            reducer = None
            if reducer_name is not None:
                reducer = _named_reducer(reducer_name, path, problems, yaml=True)
            field = _field(key, check, reducer, path, problems)
            if field is not None:
                fields.append(field)
        return cls(fields)

    # -- merging ----------------------------------------------------------------

    def check_input(self, state: Mapping[str, Any]) -> list[str]:
        """Every declared key of an input state whose value has the wrong type."""
        return [f"state key {key!r} must be {field.check.label} (state schema), got "
                f"{describe(state[key])}"
                for key, field in self.fields.items()
                if key in state and field.check is not None and not field.check.accepts(state[key])]

    def apply(self, state: dict, update: Mapping[str, Any], *, node: str,
              context: ExecutionContext, from_lua: bool = False) -> Mapping[str, Any]:
        """Merge ``update`` (from ``node``) into ``state``; returns what was set, key by key.

        Reducer keys combine with their value, other keys are replaced, and
        every declared type is checked before anything changes: on a
        ``StateSchemaError`` the state is as it was. In a branch, the writes
        to reducer keys are recorded on ``context`` for the fan-in.
        """
        fields = self.fields
        if not fields:
            state.update(update)
            return update
        applied: dict[str, Any] = {}
        writes: list[tuple[str, Any]] | None = None
        for key, value in update.items():
            field = fields.get(key)
            if field is None:
                applied[key] = value
                continue
            if from_lua and isinstance(value, dict) and not value and field.empty_table_is_list:
                value = []
            new = value
            reducer = field.reducer
            if reducer is not None:
                try:
                    new = reducer.reduce(state.get(key, MISSING), value)
                except Exception as exc:
                    raise self._violation(node, context, state, REDUCER_ERROR,
                                          _reducer_failed(field, exc)) from exc
                if writes is None:
                    writes = []
                writes.append((key, value))
            check = field.check
            if check is not None and not check.accepts(new):
                raise self._violation(node, context, state, STATE_TYPE_ERROR,
                                      _mismatch(field, new, value))
            applied[key] = new
        state.update(applied)
        if writes is not None and context.reducer_writes is not None:
            context.reducer_writes.extend(writes)
        return applied

    def combine(self, state: dict, results: Sequence[ParallelFlowResult], *, node: str,
                context: ExecutionContext) -> None:
        """Fold the successful branches' writes to reducer keys into ``state``, in result order.

        Runs before fan-in node ``node``; a failed, timed-out or cancelled
        branch contributes nothing (its state is in its result).
        """
        if not self.reducers:
            return
        folds: dict[str, Accumulator] = {}
        writes: list[tuple[str, Any]] = []
        for result in results:
            if not result.success or not result.reducer_writes:
                continue
            for key, value in result.reducer_writes:
                reducer = self.reducers.get(key)
                if reducer is None:
                    continue
                fold = folds.get(key)
                try:
                    if fold is None:
                        fold = folds[key] = reducer.accumulator(state.get(key, MISSING))
                    fold.add(value)
                except Exception as exc:
                    raise self._violation(
                        node, context, state, REDUCER_ERROR,
                        f"combining the write of branch {result.branch!r}: "
                        f"{_reducer_failed(self.fields[key], exc)}") from exc
            writes.extend(result.reducer_writes)
        if not folds:
            return
        applied = {key: fold.value for key, fold in folds.items()}
        for key, value in applied.items():
            check = self.fields[key].check
            if check is not None and not check.accepts(value):
                raise self._violation(node, context, state, STATE_TYPE_ERROR,
                                      f"combining the branches' writes: "
                                      f"{_mismatch(self.fields[key], value, None)}")
        state.update(applied)
        if context.reducer_writes is not None:
            context.reducer_writes.extend(writes)
        context.merged(node, applied)

    @staticmethod
    def _violation(node: str, context: ExecutionContext, state: dict, error_type: str,
                   detail: str) -> StateSchemaError:
        where = f"node {node!r}" + (f" in branch {context.branch_name!r}" if context.branch_name else "")
        return StateSchemaError(f"{where}: {detail}", node=node, branch=context.branch_name,
                                error_type=error_type, state=dict(state))


def _mismatch(field: Field, value: Any, update: Any) -> str:
    assert field.check is not None
    text = f"state key {field.key!r} must be {field.check.label}, got {describe(value)}"
    if field.reducer is not None and update is not None:
        text += f" (after reducer {field.reducer.name!r} combined the update {describe(update)})"
    return text


def _reducer_failed(field: Field, exc: Exception) -> str:
    assert field.reducer is not None
    detail = str(exc) if isinstance(exc, ReducerError) else f"{type(exc).__name__}: {exc}"
    return f"state key {field.key!r}: reducer {field.reducer.name!r} failed: {detail}"


def _what(value: Any) -> str:
    if isinstance(value, type):
        return f"class {value.__qualname__}"
    return type(value).__name__


def _named_type(name: Any, path: str, problems: list[str]) -> TypeCheck | None:
    try:
        return statetypes.from_name(name)
    except KeyError as exc:
        bad = exc.args[0] if exc.args else name
        problems.append(unknown(f"{path}: unknown type {bad!r}", bad, statetypes.TYPE_NAMES)
                        + " (join types with '|', e.g. 'str | none')")
        return None


def _named_reducer(name: Any, path: str, problems: list[str], *, yaml: bool) -> Reducer | None:
    if isinstance(name, str) and name in BUILT_IN:
        return built_in(name)
    hint = "" if not yaml else " (YAML names a built-in reducer; a Python callable needs StateGraph)"
    problems.append(unknown(f"{path}: unknown reducer {name!r}", name, BUILT_IN) + hint)
    return None


def _field(key: str, check: TypeCheck | None, reducer: Reducer | None, path: str,
           problems: list[str]) -> Field | None:
    """The field, unless its reducer produces values its type refuses (it could never hold)."""
    if reducer is not None and check is not None and reducer.produces is not None \
            and not check.may_hold(reducer.produces):
        problems.append(f"{path}: reducer {reducer.name!r} makes a {reducer.produces.__name__}, "
                        f"which type {check.label} does not accept")
        return None
    if isinstance(reducer, CallableReducer) and check is not None:
        reducer.start_factory = check.empty_factory
    return Field(key, check, reducer)


def _python_field(key: Any, spec: Any, path: str, problems: list[str], *,
                  annotation: bool = False) -> Field | None:
    """A field from a TypedDict annotation (``annotation``) or a ``{key: ...}`` value."""
    if not isinstance(key, str) or not key:
        problems.append(f"state_schema: a state key must be a non-empty string, got {key!r}")
        return None
    if isinstance(spec, Mapping) and not annotation:  # the long form, as in YAML
        for extra in sorted(set(spec) - FIELD_KEYS, key=str):
            problems.append(unknown(f"{path}: unknown key {extra!r}", extra, FIELD_KEYS))
        kind = spec.get("type")
        check = _named_type(kind, path, problems) if isinstance(kind, str) else (
            _annotation_check(kind, path, problems) if kind is not None else None)
        reducer = _python_reducer(spec.get("reducer"), path, problems)
        return _field(key, check, reducer, path, problems)
    if isinstance(spec, str) and not annotation:
        return _field(key, None, _named_reducer(spec, path, problems, yaml=False), path, problems)
    if annotation or _is_annotation(spec):
        annotation, metadata = statetypes.split_annotated(spec)
        reducers = [m for m in metadata if callable(m) or (isinstance(m, str) and m in BUILT_IN)]
        ignored = [m for m in metadata if m not in reducers]
        if ignored:
            problems.append(f"{path}: cannot honour annotation metadata "
                            f"{', '.join(map(repr, ignored))} (only a reducer, a callable "
                            f"(old, new) -> value or a built-in name, is understood)")
        if len(reducers) > 1:
            problems.append(f"{path}: {len(reducers)} reducers in one annotation; give one")
            return None
        check = _annotation_check(annotation, path, problems)
        reducer = _python_reducer(reducers[0], path, problems) if reducers else None
        return _field(key, check, reducer, path, problems)
    if callable(spec):
        return _field(key, None, CallableReducer(spec), path, problems)
    problems.append(f"{path}: expected a reducer (a callable (old, new) -> value or one of "
                    f"{', '.join(BUILT_IN)}) or a type, got {_what(spec)}")
    return None


def _is_annotation(spec: Any) -> bool:
    return (isinstance(spec, type) or spec is None or spec is Any
            or typing.get_origin(spec) is not None or hasattr(spec, "__supertype__"))


def _annotation_check(annotation: Any, path: str, problems: list[str]) -> TypeCheck | None:
    try:
        return statetypes.from_annotation(annotation)
    except UncheckableType as exc:
        problems.append(f"{path}: cannot check type {annotation!r}: {exc}")
        return None


def _python_reducer(spec: Any, path: str, problems: list[str]) -> Reducer | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return _named_reducer(spec, path, problems, yaml=False)
    if isinstance(spec, Reducer):
        return spec
    if callable(spec) and not isinstance(spec, type):
        return CallableReducer(spec)
    problems.append(f"{path}: a reducer must be a callable (old, new) -> value or one of "
                    f"{', '.join(BUILT_IN)}, got {_what(spec)}")
    return None
