"""Reading a YAML document's ``settings:`` (lua, parallel, checkpoint) into compile() options.

``SettingsReader`` checks every key, with the closest allowed name for a
typo, and records each problem (naming its ``settings.…`` path) instead of
stopping at the first; ``DocumentBuilder`` (yaml_builder.py) reads the
nodes and edges on top of it. What the engine's caller chose arrives as
``EngineOptions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache_store import SqliteCache
from .checkpoint.store import SqliteCheckpointer
from .defaults import (
    DEFAULT_FAIL_FAST,
    DEFAULT_ISOLATION,
    DEFAULT_LUA_MAX_MEMORY,
    DEFAULT_LUA_TIMEOUT,
    DEFAULT_MAX_STEPS,
)
from .isolation.registry import (
    available_backends,
    backend_options,
    backends_accepting,
    every_backend_option,
)
from .keys import (
    CACHE_SETTINGS_KEYS,
    CHECKPOINT_SETTINGS_KEYS,
    LUA_SETTINGS_KEYS,
    PARALLEL_KEYS,
    SETTINGS_KEYS,
    UNTRUSTED_BACKEND_OPTIONS,
    unknown,
)
from .retry import parse_policy
from .sizes import parse_size


@dataclass(frozen=True)
class EngineOptions:
    """What a ``YAMLEngine``'s caller chose: every document it loads is read with these.

    The engine makes one and hands it to the builder, so reading a document
    needs nothing of the engine itself.
    """

    lua_enabled: bool = True
    lua_timeout: float | None = DEFAULT_LUA_TIMEOUT
    # The caller gave lua_timeout: settings.lua.timeout cannot change it then.
    lua_timeout_explicit: bool = False
    isolation: str | None = None
    max_workers: int | None = None
    allow_python: bool = True
    checkpointer: SqliteCheckpointer | None = None
    # The node cache (YAMLEngine(cache=...), or for a subgraph file its includer's).
    cache: SqliteCache | None = None
    # settings.parallel keys and backend options, which override the document's
    # (a copy of the caller's; read, never changed).
    parallel: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LuaCeiling:
    """The Lua limits of a file that includes another: the included file may only lower them."""

    timeout: float | None
    max_memory: int | None
    file: str  # the including file's name, for messages


def contained_file(base_dir: Path, reference: str) -> Path:
    """``reference`` resolved inside ``base_dir``; ``ValueError`` if it could leave it.

    Refused: absolute paths, ``..`` components, and paths whose symlinks
    resolve outside ``base_dir``.
    """
    path = Path(reference)
    if path.is_absolute():
        raise ValueError("must be a path relative to the workflow's directory")
    if ".." in path.parts:
        raise ValueError("must not contain '..'")
    root = base_dir.resolve()
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte; a symlink loop (3.11)
        raise ValueError(f"is not a usable path ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise ValueError("resolves (through a symlink) outside the workflow's directory")
    if resolved.exists() and not resolved.is_file():
        raise ValueError("is not a regular file")
    return resolved


# The database a checkpoint directory (the peer format's config.checkpoint_dir) holds.
CHECKPOINT_DIRECTORY_FILE = "checkpoints.sqlite"


class SettingsReader:
    """Reads ``settings:`` and collects problems in ``problems``."""

    def __init__(self, engine_options: EngineOptions, source: str | None,
                 base_dir: Path | None) -> None:
        self.engine_options = engine_options
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []
        # Options of the backends that do not run, by name: used if a run's config picks one.
        self.other_backends_options: dict[str, dict[str, Any]] = {}
        # The peer format's config.checkpoint_dir, once its document is translated.
        self.checkpoint_directory: Any = None

    def problem(self, text: str) -> None:
        """Record one problem (already naming where it is)."""
        self.problems.append(text)

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(f"{path}: must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def check_keys(self, mapping: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
        for key in sorted(set(mapping) - allowed, key=str):
            self.problem(unknown(f"{path}.{key}: unknown key", key, allowed))

    def settings(self, settings: Any) -> dict[str, Any]:
        settings = self.mapping(settings, "settings")
        self.check_keys(settings, SETTINGS_KEYS, "settings")
        lua = self.mapping(settings.get("lua"), "settings.lua")
        self.check_keys(lua, LUA_SETTINGS_KEYS, "settings.lua")
        lua_timeout, max_memory = self.lua_limits(lua)
        checkpointer = self.checkpointer(settings.get("checkpoint"))
        document = dict(self.mapping(settings.get("parallel"), "settings.parallel"))
        if "strategy" in document:
            if "isolation" in document and document["isolation"] != document["strategy"]:
                self.problem("settings.parallel: 'isolation' and its alias 'strategy' disagree")
            document.setdefault("isolation", document["strategy"])
            del document["strategy"]
        engine = self.engine_options
        # The engine's options override the document's; a message names where a value came from.
        parallel = {**document, **engine.parallel}
        origin = {key: f"settings.parallel.{key}" for key in document}
        origin.update({key: f"YAMLEngine({key}=...)" for key in engine.parallel})
        isolation = engine.isolation or parallel.get("isolation") or DEFAULT_ISOLATION
        if not isinstance(isolation, str) or isolation not in available_backends():
            chooser = "YAMLEngine(isolation=...)" if engine.isolation else "settings.parallel.isolation"
            self.problem(unknown(f"{chooser}: unknown isolation backend {isolation!r}",
                                 isolation, available_backends()))
            isolation = None
        fail_fast = parallel.get("fail_fast", DEFAULT_FAIL_FAST)
        if not isinstance(fail_fast, bool):
            self.problem(f"{origin['fail_fast']}: must be true or false, got {fail_fast!r}")
        max_steps = parallel.get("max_steps", DEFAULT_MAX_STEPS)
        if (not engine.allow_python and "max_steps" not in engine.parallel
                and isinstance(max_steps, (int, float)) and max_steps > DEFAULT_MAX_STEPS):
            self.problem(f"settings.parallel.max_steps: a Lua-only document may lower the "
                         f"limit of {DEFAULT_MAX_STEPS} steps, not raise it; got {max_steps!r}")
            max_steps = DEFAULT_MAX_STEPS
        options: dict[str, Any] = {
            "isolation": isolation or DEFAULT_ISOLATION,
            "max_workers": engine.max_workers or parallel.get("max_workers"),
            "branch_timeout": parallel.get("branch_timeout"), "fail_fast": fail_fast,
            "max_steps": max_steps, "lua_timeout": lua_timeout, "lua_max_memory": max_memory,
            "checkpointer": checkpointer, "cache": self.node_cache(settings.get("cache")),
        }
        if "branch_max_memory" in parallel:
            try:
                options["branch_max_memory"] = parse_size(parallel["branch_max_memory"])
            except ValueError as exc:
                self.problem(f"{origin['branch_max_memory']}: {exc}")
        if "retry" in parallel:
            options["branch_retry"], problems = parse_policy(parallel["retry"], origin["retry"])
            self.problems.extend(problems)
        # Settings interpreted further on (compile keywords of their own).
        handled = {"isolation", "strategy", "branch_max_memory", "retry", *options}
        for key in sorted(PARALLEL_KEYS & set(parallel) - handled):
            options[key] = parallel[key]
        options["backend_options"], self.other_backends_options = self.options_per_backend(
            isolation, document, engine)
        return options

    def options_per_backend(self, isolation: str | None, document: Mapping[str, Any],
                            engine: EngineOptions) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The options of the backend that runs, and every other backend's own section.

        Flat options (the document's, then the engine's on top) belong to
        the backend that runs, ``isolation``: the engine's choice, else the
        document's, else the default. A section (``settings.parallel.process:
        {...}``) belongs to the backend it names, whichever runs.
        """
        from_document = self.backend_sections(
            isolation, {k: v for k, v in document.items() if k not in PARALLEL_KEYS},
            "settings.parallel",
            overridden=document.get("isolation") if engine.isolation else None)
        from_engine = self.backend_sections(
            isolation, {k: v for k, v in engine.parallel.items() if k not in PARALLEL_KEYS},
            "YAMLEngine()")
        if not engine.allow_python:
            for name, section in sorted(from_document.items()):
                for key, (_, where) in sorted(section.items()):
                    if (key not in UNTRUSTED_BACKEND_OPTIONS
                            and key not in from_engine.get(name, {})):
                        self.problem(f"{where}: a Lua-only document cannot set this backend "
                                     f"option (it may decide where this process connects or "
                                     f"what it loads); pass it to YAMLEngine(...) instead")
        merged: dict[str, dict[str, Any]] = {}
        for sections in (from_document, from_engine):
            for name, section in sections.items():
                merged.setdefault(name, {}).update(
                    {key: value for key, (value, _) in section.items()})
        running = merged.pop(isolation, {}) if isolation else {}
        return running, merged

    def checkpointer(self, value: Any) -> SqliteCheckpointer | None:
        """The engine's checkpointer, else the one ``settings.checkpoint`` describes.

        Its ``path`` is relative to the workflow's directory; a Lua-only
        document may name a database only inside that directory, and may
        not turn on ``pickle`` (a pickle in the database runs code when it
        is read).
        """
        where = "settings.checkpoint"
        settings = self.mapping(value, where)
        self.check_keys(settings, CHECKPOINT_SETTINGS_KEYS, where)
        if value is not None and "path" not in settings:
            self.problem(f"{where}: needs 'path' (the database file, relative to the workflow)")
        path, pickle = settings.get("path"), settings.get("pickle", False)
        if not isinstance(pickle, bool):
            self.problem(f"{where}.pickle: must be true or false, got {pickle!r}")
        elif pickle and not self.engine_options.allow_python:
            self.problem(f"{where}.pickle: a Lua-only document cannot turn on pickle (reading "
                         f"a pickled state runs code); pass YAMLEngine(checkpointer=...) instead")
        if "path" in settings and (not isinstance(path, str) or not path):
            self.problem(f"{where}.path: must be a file path, got {path!r}")
            return None
        directory = self.checkpoint_directory
        if directory is not None and value is not None:
            self.problem(f"{where} and config.checkpoint_dir both name where runs are "
                         f"recorded; give one of them")
            return None
        if self.engine_options.checkpointer is not None:
            return self.engine_options.checkpointer
        if directory is not None:
            return self.directory_checkpointer(directory)
        if path is None:
            return None
        file = self.settings_file(f"{where}.path", path)
        if file is None:
            return None
        return SqliteCheckpointer(file, pickle=pickle is True and self.engine_options.allow_python)

    def directory_checkpointer(self, directory: Any) -> SqliteCheckpointer | None:
        """The checkpointer of the peer format's ``config.checkpoint_dir``: the database
        ``CHECKPOINT_DIRECTORY_FILE`` in that directory, both made when first used."""
        where = "config.checkpoint_dir"
        if not isinstance(directory, str) or not directory:
            self.problem(f"{where}: must be a directory path, got {directory!r}")
            return None
        folder = self.settings_file(where, directory)
        if folder is None:
            return None
        return SqliteCheckpointer(folder / CHECKPOINT_DIRECTORY_FILE, create_directory=True)

    def node_cache(self, value: Any) -> SqliteCache | None:
        """The engine's node cache, else the one ``settings.cache`` describes.

        Its ``path`` is relative to the workflow's directory; a Lua-only
        document may name a file only inside that directory.
        """
        where = "settings.cache"
        settings = self.mapping(value, where)
        self.check_keys(settings, CACHE_SETTINGS_KEYS, where)
        if value is not None and "path" not in settings:
            self.problem(f"{where}: needs 'path' (the cache file, relative to the workflow)")
        path = settings.get("path")
        if "path" in settings and (not isinstance(path, str) or not path):
            self.problem(f"{where}.path: must be a file path, got {path!r}")
            return None
        if path is None or self.engine_options.cache is not None:
            return self.engine_options.cache
        file = self.settings_file(f"{where}.path", path)
        return None if file is None else SqliteCache(file)

    def settings_file(self, where: str, path: str) -> Path | None:
        """The file the setting ``where`` (``settings.cache.path``) names, relative to the
        workflow's directory; None after reporting why it cannot be used. A Lua-only
        document may name a file only inside that directory."""
        allow_python = self.engine_options.allow_python
        if Path(path).is_absolute() and allow_python:
            return Path(path)
        if self.base_dir is None:
            self.problem(f"{where}: relative path {path!r} needs load_from_file or "
                         f"base_dir")
            return None
        if not allow_python:
            try:
                return Path(contained_file(self.base_dir, path))
            except ValueError as exc:
                self.problem(f"{where}: {path!r} {exc} (allow_python=False)")
                return None
        return self.base_dir / path

    def subgraph_settings(self, settings: Any, ceiling: LuaCeiling
                          ) -> tuple[float | None, int | None]:
        """The Lua limits of a file a ``subgraph:`` node names: its ``settings.lua`` under ``ceiling``.

        Its ``settings.parallel`` and ``settings.checkpoint`` are not read:
        the including run's backend, limits and checkpointer apply.
        """
        settings = self.mapping(settings, "settings")
        self.check_keys(settings, SETTINGS_KEYS, "settings")
        lua = self.mapping(settings.get("lua"), "settings.lua")
        self.check_keys(lua, LUA_SETTINGS_KEYS, "settings.lua")
        return self.lua_limits(lua, ceiling)

    def lua_limits(self, lua: Mapping[str, Any], ceiling: LuaCeiling | None = None
                   ) -> tuple[float | None, int | None]:
        """``settings.lua``'s timeout and memory limit, checked.

        ``ceiling`` (for a file a ``subgraph:`` node names) is the including
        file's limits: they are the defaults, and a value above one (or none
        where it has one) is a problem, whatever the engine allows.
        """
        engine = self.engine_options
        lua_timeout = engine.lua_timeout if ceiling is None else ceiling.timeout
        if not engine.lua_timeout_explicit and "timeout" in lua:
            lua_timeout = lua["timeout"]
            if ceiling is not None and _raises(lua_timeout, ceiling.timeout):
                self.problem(f"settings.lua.timeout: a subgraph file may lower the Lua limits "
                             f"of the file that includes it, not raise or remove them: "
                             f"{ceiling.file} allows {ceiling.timeout}s, got {lua_timeout!r}")
                lua_timeout = ceiling.timeout
            elif not engine.allow_python and _raises(lua_timeout, engine.lua_timeout):
                self.problem(f"settings.lua.timeout: a Lua-only document may lower the engine's "
                             f"limit of {engine.lua_timeout}s, not raise or remove it; "
                             f"got {lua_timeout!r}")
                lua_timeout = engine.lua_timeout
        if lua_timeout is not None and (isinstance(lua_timeout, bool) or not isinstance(
                lua_timeout, (int, float)) or lua_timeout <= 0):
            self.problem(f"settings.lua.timeout: must be a positive number, got {lua_timeout!r}")
            lua_timeout = DEFAULT_LUA_TIMEOUT if ceiling is None else ceiling.timeout
        max_memory: int | None = DEFAULT_LUA_MAX_MEMORY if ceiling is None else ceiling.max_memory
        if "max_memory" in lua:
            try:
                max_memory = parse_size(lua["max_memory"])
            except ValueError as exc:
                self.problem(f"settings.lua.max_memory: {exc}")
            if ceiling is not None and _raises(max_memory, ceiling.max_memory):
                self.problem(f"settings.lua.max_memory: a subgraph file may lower the Lua limits "
                             f"of the file that includes it, not raise or remove them: "
                             f"{ceiling.file} allows {ceiling.max_memory} bytes, got "
                             f"{lua['max_memory']!r}")
                max_memory = ceiling.max_memory
            elif not engine.allow_python and _raises(max_memory, DEFAULT_LUA_MAX_MEMORY):
                self.problem(f"settings.lua.max_memory: a Lua-only document may lower the limit "
                             f"of {DEFAULT_LUA_MAX_MEMORY} bytes, not raise or remove it")
                max_memory = DEFAULT_LUA_MAX_MEMORY
        return lua_timeout, max_memory

    def backend_sections(self, isolation: str | None, rest: Mapping[str, Any], prefix: str, *,
                         overridden: Any = None) -> dict[str, dict[str, tuple[Any, str]]]:
        """The backend options ``rest`` gives: ``{backend: {option: (value, where)}}``.

        ``rest`` is what is left of ``settings.parallel`` (or of the engine's
        options) after the engine's own keys: a mapping per backend name,
        and flat options of the backend that runs, ``isolation``, which win
        over its mapping. Every key is checked, whether it applies or not.
        ``overridden`` is the document's own ``isolation`` when the engine
        chose another backend: a flat option of that one is an error naming
        both.
        """
        backends = available_backends()
        accepted = backend_options(isolation) if isolation else frozenset()
        sections: dict[str, dict[str, tuple[Any, str]]] = {}
        flat: dict[str, tuple[Any, str]] = {}
        for key, value in rest.items():
            where = f"{prefix}.{key}" if prefix.startswith("settings") else f"YAMLEngine({key}=...)"
            if key in backends:
                options = self.mapping(value, where)
                declared = backend_options(key)
                if declared is not None:
                    self.check_keys(options, declared, where)
                sections[key] = {option: (option_value, f"{where}.{option}")
                                 for option, option_value in options.items()}
            elif isolation is None and backends_accepting(key):
                pass  # the backend is unknown (a problem already): nothing to check against
            elif accepted is None or key in accepted:
                flat[key] = (value, where)
            elif elsewhere := backends_accepting(key):
                if overridden in elsewhere:
                    self.problem(f"{where}: an option of isolation backend {overridden!r}, which "
                                 f"settings.parallel.isolation chooses, but the caller runs "
                                 f"this graph on {isolation!r}; put it under "
                                 f"settings.parallel.{overridden} to apply it only when "
                                 f"{overridden!r} runs")
                else:
                    self.problem(f"{where}: not an option of isolation backend {isolation!r} but "
                                 f"of {', '.join(map(repr, elsewhere))}; choose that backend or "
                                 f"put it under settings.parallel.{elsewhere[0]}")
            else:
                allowed = PARALLEL_KEYS | (accepted or frozenset()) | set(backends)
                self.problem(unknown(f"{where}: unknown key", key, allowed,
                                     also_suggest=every_backend_option()))
        if isolation is not None and flat:
            sections[isolation] = {**sections.get(isolation, {}), **flat}
        return sections


def _raises(value: Any, limit: float | None) -> bool:
    """Whether the limit ``value`` is above ``limit`` or removes it (None); None is no limit."""
    if limit is None:
        return False
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit
