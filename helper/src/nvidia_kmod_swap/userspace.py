"""Userspace that matches the loaded kernel module while a swap waits (issue 23; docs/nixos.md).

NixOS points /run/opengl-driver (and /run/opengl-driver-32) at the generation's driver environment
with a systemd-tmpfiles `L+` rule (nixos/modules/hardware/graphics.nix, written to
/etc/tmpfiles.d/graphics-driver.conf), and a switch that changes it runs it again before any unit
starts (systemd-tmpfiles-resetup.service). Programs find libcuda and libnvidia-ml through a RUNPATH
of /run/opengl-driver/lib (addDriverRunpath), so while the loaded module is another version every
program started after the switch fails on the version handshake.

The pin is a runtime rule for the same paths in a file that sorts before graphics-driver.conf:
systemd-tmpfiles keeps the first line for a path in file-name order and ignores the later ones
("Duplicate line for path ..., ignoring"; systemd 252 and 257 alike). The switch's own run and any
later `systemd-tmpfiles --create` therefore keep the pin, and it is gone with /run at a reboot.

This module decides (pure) and reads what it decides on (a generation's records); swap.py applies
the decision through the effects boundary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from .config import Config
from .paths import Root
from .rules import BOOTED_CONFIG, CORE, LOADED_DRIVER, PIN_RULES, ConfigError, bin_output, loads_json, validate
from .snapshot import read_snapshot
from .state import StateDir, StateError

__all__ = ["DRIVER_LINKS", "LOADED_DRIVER", "PIN_RULES", "Pin", "Userspace", "booted", "candidates", "current", "decide",
           "graphics_rules", "matches", "shown", "this_generation"]

# addDriverRunpath's driverLink (pkgs/build-support/add-driver-runpath) and its 32-bit twin.
DRIVER_LINKS = ("/run/opengl-driver", "/run/opengl-driver-32")
BOOTED_SYSTEM = "/run/booted-system"
# nixos/modules/system/boot/systemd/tmpfiles.nix: settings.<name> becomes tmpfiles.d/<name>.conf.
GRAPHICS_RULES = "etc/tmpfiles.d/graphics-driver.conf"


class Userspace(NamedTuple):
    """One driver's userspace as its generation set it up: where the driver links pointed and
    which nvidia-smi it ran (a RUNPATH to its own libraries), and where we read that."""

    version: str
    links: tuple[tuple[str, str], ...]  # (link, environment) for each L+ rule
    nvidia_smi: str | None
    source: str


class Pin(NamedTuple):
    """What the driver links should point at now, and why (decide's answer)."""

    pinned: bool                          # the links follow LINKS, not the generation's rule
    version: str | None                   # the loaded driver's version (None: nothing loaded)
    links: tuple[tuple[str, str], ...]    # the pin's rules: (link, environment)
    nvidia_smi: str | None                # the nvidia-smi that matches the loaded module
    reason: str
    problem: str = ""                     # why the links cannot match the loaded module

    def rules(self) -> str | None:
        """PIN_RULES' text, or None for no pin."""
        if not self.pinned:
            return None
        lines = [f"# nvidia-kmod-swap: the loaded NVIDIA kernel module is {self.version}, not this generation's",
                 "# driver; programs started now get the libraries that match it. Removed by the swap, and",
                 "# gone at reboot. See `nvidia-kmod-swap status`."]
        lines += [f"L+ {link} - - - - {target}" for link, target in self.links]
        return "\n".join(lines) + "\n"


def matches(environment: str, version: str) -> bool:
    """ENVIRONMENT (a store path, read as the module files are) holds the libraries of VERSION:
    nvidia_x11's builder.sh installs every library as lib/<name>.so.<version> in `out`, which
    graphics.nix's buildEnv links."""
    return os.path.exists(os.path.join(environment, "lib", f"libnvidia-ml.so.{version}"))


def graphics_rules(text: str) -> tuple[tuple[str, str], ...]:
    """The driver links' `L+` rules in a tmpfiles.d file (tmpfiles.nix writes
    'L+' '/run/opengl-driver' '-' '-' '-' '-' /nix/store/...-graphics-drivers)."""
    found = []
    for line in text.splitlines():
        fields = [f.strip("'\"") for f in line.split()]
        if len(fields) >= 7 and fields[0] in ("L+", "L") and fields[1] in DRIVER_LINKS and fields[6].startswith("/"):
            found.append((fields[1], fields[6]))
    return tuple(found)


def _read(path: os.PathLike[str] | str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def booted(root: Root) -> Userspace | None:
    """The booted generation's userspace: its own config of this helper when it had one, else
    its graphics.nix rule (a generation from before services.nvidiaKmodSwap)."""
    system = root(BOOTED_SYSTEM)
    text = _read(root(BOOTED_CONFIG))
    if text is not None:
        try:
            config = validate(loads_json(text))
        except (ValueError, RecursionError, ConfigError):
            config = None
        if config is not None and config.get("driver_links") is not None:
            return Userspace(config["driver_version"], config["driver_links"],
                             config.get("nvidia_smi"), BOOTED_CONFIG)
    text = _read(system / GRAPHICS_RULES)
    if text is None:
        return None
    return Userspace("", graphics_rules(text), None, f"{BOOTED_SYSTEM}/{GRAPHICS_RULES}")


def decide(expected: str, loaded: str | None, this: Userspace, candidates: list[Userspace],
           holds: Callable[[str, str], bool]) -> Pin:
    """Where the driver links should point: the generation's rule (THIS) when the loaded driver is
    the generation's or none is loaded; otherwise the first of CANDIDATES whose environments hold
    the loaded version's libraries (HOLDS(environment, version): `matches`, on disk; a record is a
    claim, not a fact)."""
    if loaded is None:
        return Pin(False, None, (), None, "no NVIDIA driver is loaded: the generation's driver links apply")
    if loaded == expected:
        return Pin(False, loaded, (), this.nvidia_smi,
                   f"the loaded driver {loaded} is this generation's: its driver links apply")
    problems = []
    for candidate in candidates:
        if candidate.version and candidate.version != loaded:
            continue
        links = tuple((link, env) for link, env in candidate.links if holds(env, loaded))
        if links:
            smi = candidate.nvidia_smi if candidate.version == loaded else None
            return Pin(True, loaded, links, smi,
                       f"the loaded NVIDIA module is {loaded} and this generation's driver {expected}: programs "
                       f"started now get {loaded}'s libraries (from {candidate.source}) until the swap or a reboot")
        if candidate.links:
            problems.append(f"{candidate.source} names {', '.join(env for _, env in candidate.links)}, "
                            f"without libnvidia-ml.so.{loaded}")
    problem = (f"no driver environment of {loaded} is known"
               + (f" ({'; '.join(problems)})" if problems else "")
               + f": programs started now load {expected}'s libraries and fail on the version mismatch")
    return Pin(False, loaded, (), None, problem, problem)


def this_generation(config: Config) -> Userspace:
    return Userspace(config.driver_version, config.driver_links or (), config.nvidia_smi, "this generation's config")


def candidates(root: Root, config: Config, loaded: str) -> list[Userspace]:
    """Where the loaded driver's userspace may be read, most specific first: its driver record
    (noted while its generation was current: at boot, or by our swap to it), then the booted
    generation."""
    found = []
    try:
        record = StateDir(root(config.state_dir)).driver(loaded)
    except StateError:
        record = None
    if record is not None and record.driver_links is not None:
        smi = record.nvidia_smi or (record.verify_command[0] if record.verify_command else None)
        found.append(Userspace(loaded, record.driver_links, smi if bin_output(smi) else None,
                               f"{config.state_dir}/driver-{loaded}.json"))
    generation = booted(root)
    if generation is not None:
        if not generation.nvidia_smi and record is not None and record.verify_command:
            generation = generation._replace(nvidia_smi=record.verify_command[0])
        found.append(generation)
    return found


def current(root: Root, config: Config) -> Pin:
    """The pin as things are: the loaded version from sysfs, the environments checked on disk."""
    loaded = read_snapshot(root).version(CORE)
    found = candidates(root, config, loaded) if loaded and loaded != config.driver_version else []
    pin = decide(config.driver_version, loaded, this_generation(config), found, matches)
    if pin.nvidia_smi and not bin_output(pin.nvidia_smi):
        pin = pin._replace(nvidia_smi=None)
    return pin


def shown(root: Root) -> dict[str, str | None]:
    """Where each driver link points now (None: no link)."""
    out: dict[str, str | None] = {}
    for link in DRIVER_LINKS:
        try:
            out[link] = os.readlink(root(link))
        except OSError:
            out[link] = None
    return out
