"""The no-op path, which runs on every start of nvidia-persistenced: decide "versions match,
nothing to do" having imported nothing but os and json. Anything it is not sure of (another
command, an odd argument, a config that is not plainly valid, a pending swap, any mismatch) falls
through to the full CLI, which decides and reports properly.
"""

from __future__ import annotations

import json
import os

STATE_FILE = "swap.json"  # an interrupted swap's record, in the state dir
# The config keys (config.py checks that its parsers cover exactly these).
KEYS = frozenset({
    "driver_version", "kernel_release", "module_dirs", "modules", "rollback_dirs", "on_busy",
    "on_kernel_change", "stop_units", "verify_command", "settle_timeout_s", "state_dir", "allowed_prefixes",
})


def _parse(argv: list[str]) -> dict | None:
    opts = {"--config": None, "--root": "/", "--log-target": "auto"}
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in opts and eq:
            opts[key] = value
        elif arg in opts and i + 1 < len(argv):
            opts[arg] = argv[i + 1]
            i += 1
        else:
            rest.append(arg)
        i += 1
    if len(rest) != 1 or rest[0] not in ("check", "swap"):
        return None
    return {"command": rest[0], "root": opts["--root"], "log_target": opts["--log-target"],
            "config": opts["--config"] or os.path.join(opts["--root"], "etc/nvidia-kmod-swap/config.json")}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def try_noop(argv: list[str]) -> int | None:
    """0 when the loaded driver is the profile's and nothing is pending; None: use the full CLI."""
    args = _parse(argv)
    if args is None:
        return None
    text = _read(args["config"])
    try:
        config = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(config, dict) or not set(config) <= KEYS:
        return None
    version, state_dir = config.get("driver_version"), config.get("state_dir", "/run/nvidia-kmod-swap")
    if not isinstance(version, str) or not isinstance(state_dir, str) or not isinstance(config.get("module_dirs"), list):
        return None
    root = args["root"]

    def path(p: str) -> str:
        return os.path.join(root, p.lstrip("/"))

    if os.path.lexists(os.path.join(path(state_dir), STATE_FILE)):
        return None  # an interrupted swap: the full path recovers it
    modules = _read(path("/proc/modules"))
    if modules is None:
        return None
    names = [line.split(" ", 1)[0] for line in modules.splitlines() if line.startswith("nvidia")]
    if "nvidia" not in names:
        return None
    for name in names:
        loaded = _read(path(f"/sys/module/{name}/version"))
        if loaded is not None and loaded.strip() != version:
            return None
    if args["command"] == "swap":
        _report(f"loaded NVIDIA driver {version} matches the system profile", version, args["log_target"])
    return 0


def _report(message: str, version: str, target: str) -> None:
    """The `noop` journal entry (journal.py imports nothing heavy)."""
    from .journal import Reporter

    Reporter(target).event("noop", message, action="none", loaded_version=version, expected_version=version)
