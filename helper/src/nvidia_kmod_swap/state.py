"""The helper's records in its state directory, typed, each with a `format` checked on read.

swap.json    a swap in progress: written before every step, so that a run after a crash knows
             what to finish or roll back (and which stopped units to start again)
loaded.json  the files our last successful swap loaded: the next swap's rollback source
failed.json  a swap that failed and was rolled back: not retried with the same files
deferred.json  a swap deferred until the GPU is idle (or a reboot): since when, why, who holds
             the GPU; `retry-deferred` (a timer) finishes it when the holders are gone

A record that exists but cannot be read as its format is a StateError, never "no record": acting on
a guess could unload the driver and load nothing.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

from .models import LoadStep
from .rules import DEFERRED_RECORD, STATE_FILE, driver_record, driver_record_json

FORMAT = 2
LOADED_RECORD = "loaded.json"
FAILED_RECORD = "failed.json"

__all__ = ["DEFERRED_RECORD", "FAILED_RECORD", "FORMAT", "LOADED_RECORD", "STATE_FILE", "DeferredRecord",
           "DriverRecord", "FailedRecord", "LoadedRecord", "StateError", "StateDir", "SwapState"]


class StateError(Exception):
    """A record in the state directory that exists but cannot be read, or a state directory
    that cannot be used (not ours, read-only, full)."""


def _steps(value: object, what: str) -> tuple[LoadStep, ...]:
    if not isinstance(value, list):
        raise StateError(f"{what}: expected a list of modules, got {value!r}")
    steps = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise StateError(f"{what}: not a module entry: {item!r}")
        if isinstance(item.get("depends"), list):
            item = {**item, "depends": tuple(item["depends"])}  # JSON has no tuples; a step is hashed
        try:
            steps.append(LoadStep(**item))
        except TypeError as e:
            raise StateError(f"{what}: {e}") from e
    return tuple(steps)


@functools.cache
def _steps_json(steps: tuple[LoadStep, ...]) -> list[dict[str, Any]]:
    # Without `depends`: a helper before it refuses a step with a key it does not know, and the
    # records outlive a switch back to a generation with an older helper (deploy-rs's rollback).
    return [{k: v for k, v in step._asdict().items() if k != "depends"} for step in steps]


def _optional_str(value: object, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise StateError(f"{where}: {value!r} is not a string")
    return value


def _optional_argv(value: object, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise StateError(f"{where}: {value!r} is not a command")
    return tuple(value)


def _optional_links(value: object, where: str) -> tuple[tuple[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise StateError(f"{where}: {value!r} is not a map of driver links")
    return tuple(sorted(value.items()))


class DriverRecord(NamedTuple):
    """The loaded driver's firmware path, verify command and userspace (its driver links and
    nvidia-smi), noted while its generation was current."""

    driver_version: str
    firmware_path: str | None
    verify_command: tuple[str, ...] | None
    driver_links: tuple[tuple[str, str], ...] | None = None
    nvidia_smi: str | None = None

    def to_json(self) -> dict[str, Any]:
        return driver_record_json(self.driver_version, self.firmware_path, self.verify_command,
                                  self.driver_links, self.nvidia_smi)


class SwapState:
    """A swap in progress (mutable: the swap updates it before every step). PHASE: stopping-units,
    prerequisites, unloading, loading, verifying, rolling-back. CHANGED: some module was unloaded or
    loaded (before that, nothing to undo). STARTED, UPDATED: time.time() (default: now)."""

    FIELDS = ("expected_version", "loaded_version", "load", "rollback", "phase", "step", "detail", "changed",
              "stopped_units", "reason", "started", "updated", "rollback_firmware_path", "rollback_verify_command")
    __slots__ = FIELDS

    def __init__(self, expected_version: str, loaded_version: str | None, load: tuple[LoadStep, ...],
                 rollback: tuple[LoadStep, ...], phase: str = "starting", step: int = 0, detail: str = "",
                 changed: bool = False, stopped_units: list[str] | None = None, reason: str = "",
                 started: float | None = None, updated: float | None = None,
                 rollback_firmware_path: str | None = None,
                 rollback_verify_command: tuple[str, ...] | None = None) -> None:
        now = time.time()
        self.expected_version = expected_version
        self.loaded_version = loaded_version
        self.load = load
        self.rollback = rollback
        self.phase = phase
        self.step = step
        self.detail = detail
        self.changed = changed
        self.stopped_units: list[str] = [] if stopped_units is None else stopped_units
        self.reason = reason
        self.started = now if started is None else started
        self.updated = now if updated is None else updated
        # The loaded driver's own firmware path and verify command (driver-<version>.json), for the rollback.
        self.rollback_firmware_path = rollback_firmware_path
        self.rollback_verify_command = rollback_verify_command

    def __repr__(self) -> str:
        return f"SwapState({', '.join(f'{name}={getattr(self, name)!r}' for name in self.FIELDS)})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not SwapState:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def to_json(self) -> dict[str, Any]:
        # Written before every step of a swap, while the GPU may have no driver: the fields as they
        # are and the module steps converted once per run, not a deep copy of it all each time.
        data = {name: getattr(self, name) for name in self.FIELDS}
        data["load"], data["rollback"] = _steps_json(self.load), _steps_json(self.rollback)
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> SwapState:
        if not isinstance(data, dict):
            raise StateError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise StateError(f"{where}: format {data.get('format')!r}, this helper reads format {FORMAT}")
        try:
            expected = data["expected_version"]
            if not isinstance(expected, str):
                raise StateError(f"{where}: expected_version {expected!r} is not a string")
            units = data.get("stopped_units", [])
            if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
                raise StateError(f"{where}: stopped_units {units!r} is not a list of unit names")
            return cls(expected, data.get("loaded_version"), _steps(data["load"], f"{where}: load"),
                       _steps(data["rollback"], f"{where}: rollback"), str(data.get("phase", "")),
                       int(data.get("step", 0)), str(data.get("detail", "")), bool(data.get("changed", True)),
                       list(units), str(data.get("reason", "")),
                       # when the interrupted swap started and last noted a step (now, for an older record)
                       started=float(data["started"]) if "started" in data else None,
                       updated=float(data["updated"]) if "updated" in data else None,
                       rollback_firmware_path=_optional_str(data.get("rollback_firmware_path"), where),
                       rollback_verify_command=_optional_argv(data.get("rollback_verify_command"), where))
        except KeyError as e:
            raise StateError(f"{where}: missing {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise StateError(f"{where}: {e}") from e


class LoadedRecord(NamedTuple):
    """The files of the driver this helper loaded last (loaded.json)."""

    driver_version: str
    modules: tuple[LoadStep, ...]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "driver_version": self.driver_version, "modules": _steps_json(self.modules)}


class FailedRecord(NamedTuple):
    """A swap that failed and was rolled back: not retried with the same files without --retry."""

    driver_version: str
    load: tuple[str, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "driver_version": self.driver_version, "load": list(self.load),
                "reason": self.reason, "time": time.time()}

    def as_failure(self) -> dict[str, Any]:
        return {"driver_version": self.driver_version, "load": list(self.load), "reason": self.reason}


class DeferredRecord(NamedTuple):
    """A deferred swap. WAITS_FOR: "idle" (processes hold the GPU) or "reboot" (a new kernel)."""

    expected_version: str
    loaded_version: str | None
    waits_for: str
    reason: str
    holder_pids: tuple[int, ...]
    holder_units: tuple[str, ...]
    since: float  # time.time() of the first deferral of this swap

    def to_json(self) -> dict[str, Any]:
        data = self._asdict()
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: object, where: str) -> DeferredRecord:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StateError(f"{where}: not a record this helper reads (format {FORMAT})")
        try:
            return cls(str(data["expected_version"]), data.get("loaded_version"), str(data["waits_for"]),
                       str(data.get("reason", "")), tuple(int(p) for p in data.get("holder_pids", ())),
                       tuple(str(u) for u in data.get("holder_units", ())), float(data["since"]))
        except KeyError as e:
            raise StateError(f"{where}: missing {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise StateError(f"{where}: {e}") from e


class StateDir(NamedTuple):
    """The helper's state directory (config.state_dir): ours and 0700; its records are replaced atomically."""

    path: Path

    def ensure(self) -> None:
        """Creates the directory (0700, ours); StateError naming the cause when it cannot be used."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.path)
        except OSError as e:
            raise StateError(f"cannot create the state directory {self.path}: {e.strerror}") from e
        if os.path.islink(self.path) or not os.path.isdir(self.path) or st.st_uid != os.geteuid():
            raise StateError(f"state directory {self.path} is not a directory owned by us (a symlink?)")
        try:
            os.chmod(self.path, 0o700)
        except OSError as e:
            raise StateError(f"cannot use the state directory {self.path}: {e.strerror}") from e

    def read(self, name: str) -> object | None:
        """A record's JSON as it is (None when there is none); StateError when it cannot be read."""
        return self._read(name)

    def _read(self, name: str) -> object | None:
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {self.path / name}: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            data: object = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            return data
        except ValueError as e:
            raise StateError(f"{self.path / name} is not JSON ({e})") from e

    def write(self, name: str, data: dict[str, Any]) -> None:
        """Atomically (temp file, fsync, rename, fsync of the directory); OSError when it cannot."""
        tmp = f"{self.path}/.{name}.tmp"
        # json.dumps without indent: the C encoder (json.dump and any indent use the Python one).
        # ASCII (ensure_ascii), written as bytes: no text file object per record (one per swap step).
        raw = json.dumps(data).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, f"{self.path}/{name}")
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path / name)

    def swap_state(self) -> SwapState | None:
        data = self._read(STATE_FILE)
        return None if data is None else SwapState.from_json(data, str(self.path / STATE_FILE))

    def loaded(self) -> LoadedRecord | None:
        data = self._read(LOADED_RECORD)
        if data is None:
            return None
        where = str(self.path / LOADED_RECORD)
        # Format 1 (no "format" key) had the same fields; it may be in /run when the helper is upgraded.
        if not isinstance(data, dict) or data.get("format", 1) not in (1, FORMAT) or not isinstance(data.get("driver_version"), str):
            raise StateError(f"{where}: not a record this helper reads (format 1 or {FORMAT})")
        return LoadedRecord(data["driver_version"], _steps(data.get("modules"), where))

    def failed(self) -> FailedRecord | None:
        data = self._read(FAILED_RECORD)
        if data is None:
            return None
        where = str(self.path / FAILED_RECORD)
        if (not isinstance(data, dict) or data.get("format", 1) not in (1, FORMAT)
                or not isinstance(data.get("driver_version"), str)
                or not isinstance(data.get("load"), list) or not all(isinstance(p, str) for p in data["load"])):
            raise StateError(f"{where}: not a record this helper reads (format 1 or {FORMAT})")
        return FailedRecord(data["driver_version"], tuple(data["load"]), str(data.get("reason", "")))

    def driver(self, version: str) -> DriverRecord | None:
        """driver-<VERSION>.json, or None when it is missing or unreadable (it only helps a rollback)."""
        name = driver_record(version)
        if name is None:
            return None
        try:
            data = self._read(name)
        except StateError:
            return None
        if not isinstance(data, dict) or data.get("driver_version") != version:
            return None
        where = str(self.path / name)
        try:
            return DriverRecord(data["driver_version"], _optional_str(data.get("firmware_path"), where),
                                _optional_argv(data.get("verify_command"), where),
                                _optional_links(data.get("driver_links"), where),
                                _optional_str(data.get("nvidia_smi"), where))
        except StateError:
            return None

    def write_driver(self, record: DriverRecord) -> None:
        name = driver_record(record.driver_version)
        if name is not None:
            self.write(name, record.to_json())

    def written(self, name: str) -> tuple[int, int] | None:
        """Which write of NAME is there now (inode and mtime: write() replaces the file), or None."""
        try:
            st = os.lstat(self.path / name)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def deferred(self) -> DeferredRecord | None:
        data = self._read(DEFERRED_RECORD)
        return None if data is None else DeferredRecord.from_json(data, str(self.path / DEFERRED_RECORD))

    def record_deferral(self, record: DeferredRecord) -> DeferredRecord:
        """Writes RECORD, keeping the `since` of a deferral of the same swap; returns what was written."""
        try:
            previous = self.deferred()
        except StateError:
            previous = None
        if (previous is not None and previous.expected_version == record.expected_version
                and previous.loaded_version == record.loaded_version and previous.waits_for == record.waits_for):
            record = DeferredRecord(record.expected_version, record.loaded_version, record.waits_for, record.reason,
                                    record.holder_pids, record.holder_units, previous.since)
        self.write(DEFERRED_RECORD, record.to_json())
        return record
