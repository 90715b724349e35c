"""``servekit serve --config servekit.toml``: the settings table, the file, and flags over it.

Every setting has one row in :data:`SETTINGS`: its flag's argparse ``dest``, where it lives in
the TOML file (``section.key``), its type and its default. The file holds anything the flags
hold; a flag given on the command line overrides the file, the file overrides the default::

    [server]
    host = "127.0.0.1"
    port = 8000
    api_keys = "keys.json"          # relative paths are relative to this file
    grace_period = 30

    [engine]
    max_num_seqs = 64
    enable_prefix_caching = true
    policy = "priority"             # or 'fair:{"weights": {"gold": 2}}', or a table:
    # policy = { name = "fair", args = { weights = { gold = 2.0 } } }

    [limits]
    store = "redis://127.0.0.1:6379/0"

    [[hooks]]                       # or: hooks = ["request_log", "stats"]
    name = "request_log"

A value of the wrong type, an unknown key or section, and a plugin that cannot be built all
raise :class:`ConfigError` naming the file and the key (or the flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import frozen

from servekit.errors import ServekitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "SETTINGS",
    "ConfigError",
    "Setting",
    "apply_config",
    "build_checked",
    "default",
    "load_config",
    "origin_of",
]


class ConfigError(ServekitError, ValueError):
    """A bad configuration value; the message names the file and key, or the flag."""


@frozen(slots=True)
class Setting:
    """One setting: argparse ``dest``, ``section.key`` in the file, value type, default."""

    dest: str
    key: str  #: ``section.key`` (``hooks`` is top level)
    kind: str  #: int, float, str, bool, path, str_list, spec, spec_list
    default: Any = None
    flag: str = ""  #: the command-line flag (default: ``--`` + dest with dashes)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.dest.replace("_", "-")


#: Every setting of ``servekit serve``.
SETTINGS: tuple[Setting, ...] = (
    Setting("host", "server.host", "str", "127.0.0.1"),
    Setting("port", "server.port", "int", 8000),
    Setting("grpc_port", "server.grpc_port", "int"),
    Setting("api_keys", "server.api_keys", "path"),
    Setting("grace_period", "server.grace_period", "float", 30.0),
    Setting("served_model_name", "server.served_model_name", "str_list"),
    Setting("log_level", "server.log_level", "str", "info"),
    Setting("access_log", "server.access_log", "bool", False),
    Setting("model", "engine.model", "path"),
    Setting("max_model_len", "engine.max_model_len", "int"),
    Setting("max_num_seqs", "engine.max_num_seqs", "int", 128),
    Setting("max_num_batched_tokens", "engine.max_num_batched_tokens", "int", 2048),
    Setting("max_waiting_requests", "engine.max_waiting_requests", "int", 1024),
    Setting("kv_cache_mb", "engine.kv_cache_mb", "int", 256),
    Setting("block_size", "engine.block_size", "int", 16),
    Setting("enable_prefix_caching", "engine.enable_prefix_caching", "bool", True),
    Setting("device", "engine.device", "str", "cpu"),
    Setting("dtype", "engine.dtype", "str"),
    Setting("policy", "engine.policy", "spec", "fcfs"),
    Setting("victim_policy", "engine.victim_policy", "spec"),
    Setting("runner", "engine.runner", "spec", "transformers"),
    Setting("guided_backend", "engine.guided_backend", "str", "xgrammar"),
    Setting("guided_fallback_after", "engine.guided_fallback_after", "float", 2.0),
    Setting("fake", "engine.fake", "bool", False),
    Setting("engine_process", "engine.process", "bool", False, flag="--engine-process"),
    Setting("api_processes", "server.api_processes", "int", 1, flag="--api-processes"),
    Setting("fake_token_delay", "engine.fake_token_delay", "float", 0.0),
    Setting("fake_tokens_per_yield", "engine.fake_tokens_per_yield", "int", 1),
    Setting("fake_model_cost", "engine.fake_model_cost", "str"),
    Setting("limiter_store", "limits.store", "str", flag="--limiter-store"),
    # hardening: body, stream and connection limits, store outages, metric names (docs/server.md)
    Setting("max_body_bytes", "server.max_body_bytes", "int"),
    Setting("send_timeout", "server.send_timeout", "float", 30.0),
    Setting("timeout_keep_alive", "server.timeout_keep_alive", "float", 5.0),
    Setting("header_timeout", "server.header_timeout", "float", 10.0),
    Setting("rate_limit_fail_open", "limits.fail_open", "bool", False,
            flag="--rate-limit-fail-open"),
    Setting("rate_limit_outage_retry_after", "limits.outage_retry_after", "float", 10.0,
            flag="--rate-limit-outage-retry-after"),
    Setting("metrics_style", "metrics.style", "str", "prometheus", flag="--metrics-style"),
    Setting("hook", "hooks", "spec_list", (), flag="--hook"),
    # usage ledger: outbox in the data directory, drained into the sinks (docs/usage.md)
    Setting("usage", "usage.sinks", "str_list", flag="--usage"),
    Setting("data_dir", "usage.data_dir", "path", flag="--data-dir"),
    Setting("usage_fail_open", "usage.fail_open", "bool", False, flag="--usage-fail-open"),
    Setting("usage_max_rows", "usage.max_rows", "int", 1_000_000, flag="--usage-max-rows"),
    Setting("usage_max_age", "usage.max_age", "float", 7 * 86400.0, flag="--usage-max-age"),
)

#: Sections of ``servekit.toml`` that other commands read (``servekit ray-serve``'s ``[ray]``):
#: a command whose settings do not include them skips them, so one file serves every command.
OTHER_COMMANDS_SECTIONS: tuple[str, ...] = ("ray",)

#: attribute of the parsed arguments that records where each value came from
_ORIGINS = "_config_origins"


def load_config(path: Path, settings: Sequence[Setting] = SETTINGS) -> dict[str, Any]:
    """The settings ``path`` holds, ``{dest: value}``, checked and normalised (specs become
    ``NAME`` or ``NAME:{json}`` strings, paths are resolved against the file's directory).
    ``settings`` is the table of what the file may hold (a command that takes more settings,
    e.g. ``servekit ray-serve``, passes :data:`SETTINGS` plus its own rows)."""
    by_key = {s.key: s for s in settings}
    sections = sorted({s.key.partition(".")[0] for s in settings if "." in s.key})
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name in by_key:  # a top-level setting (hooks)
            _put(values, by_key[name], value, path)
        elif name in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: [{name}] must be a table, got {value!r}")
            for key, item in value.items():
                setting = by_key.get(f"{name}.{key}")
                if setting is None:
                    known = ", ".join(s.key.partition(".")[2] for s in settings
                                      if s.key.startswith(name + "."))
                    raise ConfigError(f"{path}: unknown key {name}.{key}; [{name}] takes {known}")
                _put(values, setting, item, path)
        elif name in OTHER_COMMANDS_SECTIONS and isinstance(value, Mapping):
            continue  # another command's table; that command checks it
        else:
            raise ConfigError(f"{path}: unknown section or key {name!r}; known: "
                              f"{', '.join([*sections, 'hooks'])}")
    return values


def apply_config(args: argparse.Namespace,
                 settings: Sequence[Setting] = SETTINGS) -> argparse.Namespace:
    """Fill every setting the command line left unset (None) from ``args.config`` (if given),
    else from its default; record where each value came from (see :func:`origin_of`)."""
    config = getattr(args, "config", None)
    from_file = load_config(Path(config), settings) if config is not None else {}
    origins: dict[str, str] = {}
    for setting in settings:
        given = getattr(args, setting.dest, None)
        if given is not None and given != []:
            origins[setting.dest] = setting.option
            if setting.kind in ("spec", "spec_list"):
                for spec in [given] if setting.kind == "spec" else given:
                    _check_spec(spec, setting.option)
        elif setting.dest in from_file:
            setattr(args, setting.dest, from_file[setting.dest])
            origins[setting.dest] = f"{config}: {setting.key}"
        else:
            default = setting.default
            setattr(args, setting.dest, list(default) if isinstance(default, tuple) else default)
            origins[setting.dest] = f"the default of {setting.option}"
    setattr(args, _ORIGINS, origins)
    return args


def origin_of(args: argparse.Namespace, dest: str) -> str:
    """Where setting ``dest`` came from: ``"--policy"``, ``"servekit.toml: engine.policy"``."""
    origins: dict[str, str] = getattr(args, _ORIGINS, {})
    return origins.get(dest, "--" + dest.replace("_", "-"))


def build_checked(args: argparse.Namespace, dest: str, build: Callable[[], Any]) -> Any:
    """``build()``, with any error it raises turned into a :class:`ConfigError` naming where
    the setting ``dest`` came from (the flag, or the file and key)."""
    try:
        return build()
    except ServekitError as exc:
        raise ConfigError(f"{origin_of(args, dest)}: {exc}") from exc


def _put(values: dict[str, Any], setting: Setting, value: Any, path: Path) -> None:
    where = f"{path}: {setting.key}"
    values[setting.dest] = _CHECKS[setting.kind](value, where, path)


def _int(value: Any, where: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return value


def _float(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _str(value: Any, where: str, path: Path) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _bool(value: Any, where: str, path: Path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _path(value: Any, where: str, path: Path) -> Path:
    return path.parent / _str(value, where, path)


def _str_list(value: Any, where: str, path: Path) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{where} must be a string or a list of strings, got {value!r}")
    return list(items)


def _spec(value: Any, where: str, path: Path) -> str:
    """``"NAME"``, ``'NAME:{json}'`` or ``{name = "NAME", args = {...}}`` -> a spec string."""
    if isinstance(value, str):
        _check_spec(value, where)
        return value
    if isinstance(value, Mapping):
        extra = set(value) - {"name", "args"}
        name, args = value.get("name"), value.get("args", {})
        if extra or not isinstance(name, str) or not name or not isinstance(args, Mapping):
            raise ConfigError(
                f"{where} must be a plugin name, 'NAME:{{json}}' or a table with a string "
                f"'name' and an optional table 'args', got {value!r}")
        return f"{name}:{json.dumps(dict(args))}" if args else name
    raise ConfigError(f"{where} must be a plugin name or a table, got {value!r}")


def _spec_list(value: Any, where: str, path: Path) -> list[str]:
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where} must be a list of plugin names or tables, got {value!r}")
    return [_spec(v, f"{where}[{i}]", path) for i, v in enumerate(items)]


def _check_spec(spec: str, where: str) -> None:
    from servekit.plugins import PluginError, parse_spec

    try:
        parse_spec(spec, what=where)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


_CHECKS: dict[str, Callable[[Any, str, Path], Any]] = {
    "int": _int, "float": _float, "str": _str, "bool": _bool, "path": _path,
    "str_list": _str_list, "spec": _spec, "spec_list": _spec_list,
}


def default(dest: str) -> Any:
    """The default of setting ``dest`` (for help texts)."""
    return next(s.default for s in SETTINGS if s.dest == dest)
