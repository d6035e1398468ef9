"""The helper's configuration: one JSON file, written by the NixOS module from Nix attributes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .quick import KEYS

DEFAULT_PATH = Path("/etc/nvidia-kmod-swap/config.json")
DEFAULT_MODULES = ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")
ON_BUSY = ("defer", "fail", "stop-units")
ON_KERNEL_CHANGE = ("defer", "fail")


class ConfigError(Exception):
    """The configuration file is missing, not JSON, or has a bad key or value."""


@dataclass(frozen=True)
class Config:
    driver_version: str
    kernel_release: str
    module_dirs: tuple[str, ...]
    modules: tuple[str, ...] = DEFAULT_MODULES
    rollback_dirs: tuple[str, ...] = ()
    on_busy: str = "defer"
    on_kernel_change: str = "defer"
    stop_units: tuple[str, ...] = ()
    verify_command: tuple[str, ...] | None = None
    settle_timeout_s: float = 10.0
    state_dir: str = "/run/nvidia-kmod-swap"
    allowed_prefixes: tuple[str, ...] = ("/nix/store/",)


def _str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _str_list(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config key {key!r}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _abs_list(key: str, value: object) -> tuple[str, ...]:
    items = _str_list(key, value)
    for item in items:
        if not item.startswith("/"):
            raise ConfigError(f"config key {key!r}: {item!r} is not an absolute path")
    return items


def _abs_path(key: str, value: object) -> str:
    path = _str(key, value)
    if not path.startswith("/"):
        raise ConfigError(f"config key {key!r}: {path!r} is not an absolute path")
    return path


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"config key {key!r}: expected one of {', '.join(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def _module_name(name: str) -> str:
    return name.replace("-", "_")


PARSERS = {
    "driver_version": _str,
    "kernel_release": _str,
    "module_dirs": _abs_list,
    "modules": lambda k, v: tuple(_module_name(m) for m in _str_list(k, v)),
    "rollback_dirs": _abs_list,
    "on_busy": lambda k, v: _choice(k, v, ON_BUSY),
    "on_kernel_change": lambda k, v: _choice(k, v, ON_KERNEL_CHANGE),
    "stop_units": _str_list,
    "verify_command": lambda k, v: None if v is None else _nonempty(k, _abs_argv(k, v)),
    "settle_timeout_s": lambda k, v: _positive(k, v),
    "state_dir": lambda k, v: _abs_path(k, v),
    "allowed_prefixes": _abs_list,
}
REQUIRED = ("driver_version", "kernel_release", "module_dirs")
assert set(PARSERS) == KEYS, "quick.KEYS and config.PARSERS must name the same keys"


def _abs_argv(key: str, value: object) -> tuple[str, ...]:
    argv = _str_list(key, value)
    if argv and not argv[0].startswith("/"):
        raise ConfigError(f"config key {key!r}: the command {argv[0]!r} must be an absolute path")
    return argv


def _nonempty(key: str, value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ConfigError(f"config key {key!r}: expected a command (list) or null, got []")
    return value


def _positive(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"config key {key!r}: expected a positive number, got {value!r}")
    return float(value)


def parse(data: object) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config: expected a JSON object at the top level")
    unknown = sorted(set(data) - set(PARSERS))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(PARSERS)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"config: missing required key(s) {', '.join(map(repr, missing))}")
    values = {key: PARSERS[key](key, value) for key, value in data.items()}
    if not values["module_dirs"]:
        raise ConfigError("config key 'module_dirs': expected at least one directory")
    if values.get("on_busy") == "stop-units" and not values.get("stop_units"):
        raise ConfigError("config key 'stop_units': on_busy is 'stop-units' but no units are listed")
    return Config(**values)


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from e
    return parse(data)
