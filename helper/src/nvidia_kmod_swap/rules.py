"""The rules both paths share, importing nothing but the standard library's lightest modules:
the config's keys and their validation, and "the loaded driver is the profile's".

quick.py (the no-op path, every start of nvidia-persistenced) and the full CLI both use these, so
the fast path can never accept a config the full path refuses, nor call "current" what the planner
would swap.
"""

from __future__ import annotations

# Annotations only (mypy's always_true makes TYPE_CHECKING true for it): importing typing costs
# the no-op path, which runs on every start of the unit, 7 ms on the host, ten times that emulated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

STATE_FILE = "swap.json"  # an interrupted swap's record, in the state dir
DEFERRED_RECORD = "deferred.json"  # a swap deferred while the GPU is busy, in the state dir
# While the old driver is unloaded and the new one not yet loaded, kmod (libkmod.c
# default_config_paths, also in nixpkgs' patched kmod) reads this directory: an `install` line
# here stops the kernel's autoload (char-major-195-*) and nvidia-modprobe from loading the
# booted driver into the gap.
AUTOLOAD_BLOCK = "/run/modprobe.d/nvidia-kmod-swap.conf"
# Where the kernel's firmware loader looks first; NixOS activation points it at the generation's
# hardware.firmware. The driver loads its GSP firmware from nvidia/<its version>/ there.
FIRMWARE_PATH = "/sys/module/firmware_class/parameters/path"
DEFAULT_STATE_DIR = "/run/nvidia-kmod-swap"
# userspace.py: while a swap waits, the driver links follow the loaded module through this runtime
# tmpfiles rule (it sorts before graphics.nix's graphics-driver.conf), and LOADED_DRIVER names the
# loaded driver's `bin` output (its nvidia-smi has a RUNPATH to its own libraries).
PIN_RULES = "/run/tmpfiles.d/00-nvidia-kmod-swap-pin.conf"
LOADED_DRIVER = "/run/nvidia-loaded-driver"
# The booted generation's config of this helper (its module facts, its driver links).
BOOTED_CONFIG = "/run/booted-system/etc/nvidia-kmod-swap/config.json"
# The booted generation's kernel image (nixpkgs kernel.nix: ln -s ${kernelPath} $out/kernel).
BOOTED_KERNEL_IMAGE = "/run/booted-system/kernel"
DEFAULT_CONFIG = "/etc/nvidia-kmod-swap/config.json"  # under --root
LOG_TARGETS = ("auto", "journal", "stderr")
DEFAULT_MODULES = ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")
ON_BUSY = ("defer", "fail", "stop-units")
ON_KERNEL_CHANGE = ("defer", "fail")
REQUIRED = ("driver_version", "kernel_release", "module_dirs")
CORE = "nvidia"  # the module every other driver module depends on
# While a drain of ours is in Slurm's state (fleet.py), this record says so: the no-op path falls
# through to give it back when there is nothing left to swap.
SLURM_DRAIN = "slurm-drain.json"


# A driver's own firmware path and verify command (driver-<version>.json, in the state dir),
# noted while its generation is the current one: a rollback to it needs both. Named by version, so
# that the no-op path tells "noted already" by one stat; written by quick.py and state.py alike.
def driver_record(version: str) -> str | None:
    """The record's file name for VERSION, or None for a version that cannot be a file name."""
    if not version or "/" in version or version.startswith(".") or "\0" in version:
        return None
    return f"driver-{version}.json"


def driver_record_json(version: str, firmware_path: str | None, verify_command: Iterable[str] | None,
                       driver_links: Iterable[tuple[str, str]] | None = None,
                       nvidia_smi: str | None = None) -> dict[str, Any]:
    """The record's contents (state.py's format 2), for quick.py's note and state.DriverRecord.
    driver_links and nvidia_smi: the driver's userspace (userspace.py), which a pin to it needs."""
    return {"format": 2, "driver_version": version, "firmware_path": firmware_path,
            "verify_command": list(verify_command) if verify_command else None,
            "driver_links": None if driver_links is None else dict(driver_links), "nvidia_smi": nvidia_smi}


def bin_output(nvidia_smi: object) -> str | None:
    """The driver's `bin` output from its nvidia-smi (nvidia_x11's builder.sh: $bin/bin/nvidia-smi)."""
    if isinstance(nvidia_smi, str) and nvidia_smi.endswith("/bin/nvidia-smi"):
        return nvidia_smi.removesuffix("/bin/nvidia-smi")
    return None


# json.loads without importing json: the no-op path runs on every start of the unit, and `import
# json` (json.decoder imports re, which imports enum, functools and collections) is 170 ms of a
# 300 ms start in the test bed's guest, ~10 ms natively. The decoding is the stdlib's own: the C
# scanner json.loads uses (CPython Lib/json/scanner.py: c_make_scanner = _json.make_scanner, which
# reads these attributes of its context, Modules/_json.c scanner_new) and json.decoder's
# JSONDecoder.decode rule that only " \t\n\r" may surround the document. Anything it does not
# take is handed to json.loads itself, which raises json's own error (line and column).
class _JsonContext:
    strict = True
    object_hook = object_pairs_hook = array_hook = None  # array_hook: CPython 3.15's scanner asks for it
    parse_float = float
    parse_int = int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


def loads_json(text: str) -> Any:
    """json.loads(TEXT): the same value, or json.loads's own error, importing json only for the latter."""
    try:
        from _json import make_scanner

        scan = make_scanner(_JsonContext)  # type: ignore[arg-type]  # typeshed: "a make_scanner"
        start = len(text) - len(text.lstrip(" \t\n\r"))
        value, end = scan(text, start)
        if not text[end:].strip(" \t\n\r"):
            return value
    except Exception:  # whatever it was (no _json, a bad document), json.loads says it in json's words
        pass
    import json

    return json.loads(text)


class ConfigError(Exception):
    """The configuration file is missing, not JSON, or has a bad key or value."""


def _str(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key {key!r}: expected a non-empty string, got {value!r}")
    return value


def _str_list(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config key {key!r}: expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _abs(key: str, item: str) -> str:
    if not item.startswith("/"):
        raise ConfigError(f"config key {key!r}: {item!r} is not an absolute path")
    return item


def _abs_list(key: str, value: object) -> tuple[str, ...]:
    return tuple(_abs(key, item) for item in _str_list(key, value))


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(key: str, value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"config key {key!r}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _modules(key: str, value: object) -> tuple[str, ...]:
    return tuple(m.replace("-", "_") for m in _str_list(key, value))


def _command(key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    argv = _str_list(key, value)
    if not argv:
        raise ConfigError(f"config key {key!r}: expected a command (list) or null, got []")
    if not argv[0].startswith("/"):
        raise ConfigError(f"config key {key!r}: the command {argv[0]!r} must be an absolute path")
    return argv


def _finite(value: object) -> bool:
    """A JSON number that is not NaN or infinite (Python's json reads NaN and Infinity; NaN
    compares false with everything, so `NaN <= 0` would let it through and a wait never end)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and value == value and value not in (float("inf"), float("-inf")))


def _positive(key: str, value: object) -> float:
    if not _finite(value) or value <= 0:  # type: ignore[operator]
        raise ConfigError(f"config key {key!r}: expected a finite positive number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _not_negative(key: str, value: object) -> float:
    if not _finite(value) or value < 0:  # type: ignore[operator]
        raise ConfigError(f"config key {key!r}: expected a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _driver_links(key: str, value: object) -> tuple[tuple[str, str], ...] | None:
    """{"/run/opengl-driver": environment, ...}: graphics.nix's L+ rules of the generation."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.startswith("/run/") for k in value):
        raise ConfigError(f"config key {key!r}: expected an object of /run/... links to paths, got {value!r}")
    return tuple(sorted((link, _abs(key, _str(key, target))) for link, target in value.items()))


def _unit(key: str, value: object) -> str:
    unit = _str(key, value)
    if "/" in unit or not unit.endswith((".service", ".target")):
        raise ConfigError(f"config key {key!r}: expected a unit name like 'nvidia-persistenced.service', got {unit!r}")
    return unit


def _units(key: str, value: object) -> tuple[str, ...]:
    return tuple(_unit(key, unit) for unit in _str_list(key, value))


def _max_unavailable(key: str, value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ConfigError(f"config key {key!r}: expected a count of nodes or a percentage, got {value!r}")
    digits = text[:-1] if text.endswith("%") else text
    # No `re` here: the no-op path imports this module, and re costs it milliseconds.
    if not digits.isascii() or not digits.isdigit() or digits.startswith("0") or (digits != text and int(digits) > 100):
        raise ConfigError(f"config key {key!r}: expected a count of nodes (1, 2, ...) or a percentage "
                          f"('25%'), got {value!r}")
    return text


SLURM_KEYS = {"node": _str, "scontrol": lambda k, v: _abs(k, _str(k, v)), "max_unavailable": _max_unavailable,
              "partition": lambda k, v: None if v is None else _str(k, v), "settle_s": _not_negative,
              "units": _units}


def _slurm(key: str, value: object) -> dict[str, Any] | None:
    """{"node", "scontrol", "max_unavailable", "partition", "settle_s", "units"} or null (fleet.py)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r}: expected an object or null, got {value!r}")
    unknown = sorted(set(value) - set(SLURM_KEYS))
    missing = sorted({"node", "scontrol"} - set(value))
    if unknown or missing:
        raise ConfigError(f"config key {key!r}: " + (f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown
                                                     else f"missing key(s) {', '.join(map(repr, missing))}"))
    parsed: dict[str, Any] = {"max_unavailable": "1", "partition": None, "settle_s": 5.0, "units": ("slurmd.service",)}
    parsed.update({k: SLURM_KEYS[k](f"{key}.{k}", v) for k, v in value.items()})
    return parsed


PARSERS: dict[str, Callable[[str, object], Any]] = {
    "driver_version": _str,
    "kernel_release": _str,
    "module_dirs": _abs_list,
    "modules": _modules,
    "rollback_dirs": _abs_list,
    "on_busy": _choice(ON_BUSY),
    "on_kernel_change": _choice(ON_KERNEL_CHANGE),
    "stop_units": _units,  # compared with a holder's unit, which always has its suffix
    "verify_command": _command,
    "settle_timeout_s": _positive,
    "state_dir": lambda k, v: _abs(k, _str(k, v)),
    "allowed_prefixes": _abs_list,
    "gc_root_dir": lambda k, v: None if v is None else _abs(k, _str(k, v)),
    "firmware_path": lambda k, v: None if v is None else _abs(k, _str(k, v)),
    "kernel_image": lambda k, v: None if v is None else _abs(k, _str(k, v)),
    "busy_grace_s": _not_negative,
    "lock_timeout_s": _positive,
    "swap_unit": _unit,
    "gpu_units": _units,
    "driver_links": _driver_links,
    "module_facts": _abs_list,
    "nvidia_smi": lambda k, v: None if v is None else _abs(k, _str(k, v)),
    "slurm": _slurm,
}
KEYS = frozenset(PARSERS)


def validate(data: object) -> dict[str, Any]:
    """The config's values, parsed; ConfigError naming the first bad key otherwise."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a JSON object at the top level")
    unknown = sorted(set(data) - KEYS)
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
    return values


def parse_proc_modules(text: str) -> dict[str, tuple[list[str], frozenset[str]]]:
    """name -> (its /proc/modules fields, the modules using it). Fields: name size refcount
    users state address (kernel/module/procfs.c print_unload_info: users as "a,b,", "-", or
    "[permanent]," for a module that cannot be unloaded)."""
    rows: dict[str, tuple[list[str], frozenset[str]]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            users = frozenset(u for u in fields[3].split(",") if u and u not in ("-", "[permanent]"))
            rows[fields[0]] = (fields, users)
    return rows


def holders_closure(users: dict[str, frozenset[str]], names: Iterable[str]) -> set[str]:
    """The loaded modules among NAMES and, transitively, every loaded module holding one of them
    (USERS: module -> holders, as /proc/modules lists them)."""
    todo = list(names)
    closure: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in closure and name in users:
            closure.add(name)
            todo.extend(users[name])
    return closure


def driver_closure(users: dict[str, frozenset[str]]) -> set[str]:
    """The loaded `nvidia` and everything holding it. Every module of the driver depends on
    nvidia, so this is all of the loaded driver plus its holders (nvidia_fs); an unrelated
    nvidia_* module is not in it."""
    return holders_closure(users, [CORE])


def stale(expected: str, versions: dict[str, str | None]) -> list[str]:
    """Modules whose version is known and is not EXPECTED: a loaded driver module of another
    release, or a holder with a version of its own (only the module tree can tell which)."""
    return sorted(name for name, version in versions.items() if version is not None and version != expected)
