"""Loads by name after a live swap: which file `modprobe NAME` must load, as modprobe.d lines.

NixOS's kmod searches the booted generation's module tree first (nixpkgs
pkgs/os-specific/linux/kmod/default.nix: /run/booted-system/kernel-modules/lib/modules, then
/run/current-system/..., then /lib/modules), and udevd runs with MODULE_DIR set to the booted tree.
After a live swap the loaded driver is not the booted one, so any later load by name (nvidia-modprobe
for CUDA, libnvidia-container's --load-kmods, the open driver's udev rule `modprobe nvidia_uvm`, a
display manager's nvidia_drm, the kernel's char-major-195 autoload of `nvidia`) would load the
booted driver's file against the new `nvidia`. An `install` line per module the loaded driver ships
makes modprobe load the loaded driver's own file instead, until the next boot (/run is a tmpfs).

kmod runs an install command with /bin/sh -c, after the module's dependencies from the booted
tree's modules.dep, with $CMDLINE_OPTS replaced by the module's options from modprobe.d and the
kernel command line plus those of the modprobe command line (libkmod/libkmod-module.c,
module_do_install_commands); the first install line for a name wins, in file-name order
(libkmod-config.c), so the swap's autoload block (nvidia-kmod-swap.conf) sorts before these.
Pure: the caller reads the module files and the booted tree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .modinfo import ModInfo

BY_NAME_RULES = "/run/modprobe.d/nvidia-kmod-swap.driver.conf"
# What may stand unquoted in a /bin/sh command line (store paths and kernel module names do).
_PLAIN = re.compile(r"[A-Za-z0-9_+=./,:@-]+")


def install_lines(modules: Iterable[ModInfo], booted: Mapping[str, str], modprobe: str, insmod: str) -> list[str]:
    """One `install` line for each of MODULES whose file is not the one the booted tree has for its
    name (BOOTED: name -> resolved path); the dependencies are loaded by name first, so that a
    driver module among them comes through its own line. A path that would need shell quoting
    (never a store path) gets no line."""
    lines = []
    for info in sorted(modules, key=lambda m: m.name):
        path = str(info.path)
        if booted.get(info.name) == path or not _PLAIN.fullmatch(path):
            continue
        if not all(_PLAIN.fullmatch(word) for word in (modprobe, insmod, *info.depends)):
            continue
        deps = f"{modprobe} -a {' '.join(info.depends)} && " if info.depends else ""
        lines.append(f"install {info.name} {deps}{insmod} {path} $CMDLINE_OPTS")
    return lines


def rules_text(lines: list[str], version: str) -> str | None:
    """The file's contents, or None when no line is needed (the loaded driver is the booted one)."""
    if not lines:
        return None
    header = [f"# nvidia-kmod-swap: the loaded NVIDIA driver ({version}) is not the booted one; a load by",
              "# name gets its files until the next boot. Rewritten by every swap and rollback."]
    return "\n".join(header + lines) + "\n"
