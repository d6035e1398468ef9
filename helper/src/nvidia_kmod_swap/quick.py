"""The no-op path, which runs on every start of nvidia-persistenced: decide "versions match,
nothing to do" having imported nothing but os and rules.py (not even json: rules.loads_json). It applies the full path's own
rules (rules.py): the same config validation and the same "current" test. Anything it cannot
settle (another command, an odd argument, an invalid config, a pending swap, a module in the
driver's closure with a version of its own, any mismatch) falls through to the full CLI, which
decides by the module files and reports properly.
"""

from __future__ import annotations

import os

from .rules import (
    AUTOLOAD_BLOCK,
    CORE,
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    DEFERRED_RECORD,
    FIRMWARE_PATH,
    LOADED_DRIVER,
    LOG_TARGETS,
    PIN_RULES,
    SLURM_DRAIN,
    STATE_FILE,
    TYPE_CHECKING,
    ConfigError,
    bin_output,
    driver_closure,
    driver_record,
    driver_record_json,
    loads_json,
    parse_proc_modules,
    stale,
    validate,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["STATE_FILE", "noop", "parse_unit_argv", "try_noop"]


UNIT_COMMANDS = ("check", "swap", "retry-deferred")
UNIT_OPTIONS = ("--config", "--root", "--log-target")


def parse_unit_argv(argv: list[str]) -> dict[str, str] | None:
    """The command lines the units run: options (--config, --root, --log-target; `--opt value` or
    `--opt=value`), then one of UNIT_COMMANDS, nothing after it. They mean what cli.py's argparse
    parser makes of them, which is not worth importing and building for them (argparse, the
    gettext and locale it imports, its parser: docs/performance.md). Anything else, and anything argparse
    might read otherwise (an abbreviated option, a value that starts with "-", an empty value, an
    unknown log target), is None: argparse parses it, and says what is wrong.
    Returns {"command", "config" ("" when not given), "root", "log_target"}."""
    opts = {"--config": "", "--root": "/", "--log-target": "auto"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        key, eq, value = argv[i].partition("=")
        if key not in UNIT_OPTIONS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            i += 1
            value = argv[i]
            if value.startswith("-"):
                return None
        if not value:
            return None
        opts[key] = value
        i += 1
    rest = argv[i:]
    if len(rest) != 1 or rest[0] not in UNIT_COMMANDS or opts["--log-target"] not in LOG_TARGETS:
        return None
    return {"command": rest[0], "config": opts["--config"], "root": opts["--root"], "log_target": opts["--log-target"]}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def try_noop(argv: list[str]) -> int | None:
    """0 when the loaded driver is the profile's and nothing is pending; None: use the full CLI."""
    args = parse_unit_argv(argv)
    return None if args is None else noop(args)


def noop(args: dict[str, str]) -> int | None:
    """try_noop for a command line parse_unit_argv has read."""
    text = _read(args["config"] or os.path.join(args["root"], DEFAULT_CONFIG.lstrip("/")))
    try:
        config = validate(loads_json(text)) if text is not None else None
    except (ValueError, RecursionError, ConfigError):
        return None  # the full path says what is wrong with it
    if config is None:
        return None
    version, state_dir = config["driver_version"], config.get("state_dir", DEFAULT_STATE_DIR)
    root = args["root"]

    def path(p: str) -> str:
        return os.path.join(root, p.lstrip("/"))

    if args["command"] == "retry-deferred":
        # The timer's tick, every few seconds for good: nothing deferred, and no Slurm drain of ours
        # left to give back, is nothing to do.
        records = (DEFERRED_RECORD, SLURM_DRAIN)
        return None if any(os.path.lexists(os.path.join(path(state_dir), r)) for r in records) else 0
    if os.path.lexists(os.path.join(path(state_dir), STATE_FILE)) or os.path.lexists(path(AUTOLOAD_BLOCK)):
        return None  # an interrupted swap (or its autoload block): the full path recovers it
    if os.path.lexists(path(PIN_RULES)):
        return None  # driver links pinned to another driver: the full path looks whether they still must be
    if os.path.lexists(os.path.join(path(state_dir), SLURM_DRAIN)):
        return None  # a Slurm drain of ours: the full path gives it back when nothing is left to swap
    modules = _read(path("/proc/modules"))
    if modules is None:
        return None
    rows = parse_proc_modules(modules)
    closure = driver_closure({name: users for name, (_, users) in rows.items()})
    if CORE not in closure:
        return None
    versions = {}
    for name in closure:
        loaded = _read(path(f"/sys/module/{name}/version"))
        versions[name] = None if loaded is None else loaded.strip()
    if versions[CORE] != version or stale(version, versions):
        return None
    _note_driver(path(state_dir), version, lambda: _read(path(FIRMWARE_PATH)), config, path(LOADED_DRIVER))
    if args["command"] == "swap":
        _report(f"loaded NVIDIA driver {version} matches the system profile", version, args["log_target"])
    return 0


def _note_driver(state_dir: str, version: str, read_firmware_path: Callable[[], str | None],
                 config: dict[str, Any], loaded_driver: str) -> None:
    """driver-<version>.json: the loaded driver's firmware path, verify command and userspace, as
    its own generation set them (at boot, or after our swap), for a later rollback or pin to it; and
    LOADED_DRIVER, its tools. Written once per driver and boot: one stat on every other start."""
    name = driver_record(version)
    if name is None:
        return
    record = os.path.join(state_dir, name)
    if os.path.lexists(record):
        return
    firmware_path = read_firmware_path()  # only now: a sysfs read is not for every start
    verify = config.get("verify_command")
    nvidia_smi = config.get("nvidia_smi")
    data = driver_record_json(version, None if firmware_path is None else firmware_path.strip(),
                              verify if isinstance(verify, (list, tuple)) else None,
                              config.get("driver_links"), nvidia_smi)
    import json  # once per driver and boot

    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        tmp = record + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, record)
        tools = bin_output(nvidia_smi)
        if tools is not None:
            tmp = loaded_driver + ".tmp"
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(tools, tmp)
            os.replace(tmp, loaded_driver)
    except OSError:
        pass  # best effort: a rollback without it keeps the firmware path as it is


def _report(message: str, version: str, target: str) -> None:
    """The `noop` journal entry (journal.py imports nothing heavy)."""
    from .journal import Reporter

    Reporter(target, lean=True).event("noop", message, action="none", loaded_version=version, expected_version=version)
