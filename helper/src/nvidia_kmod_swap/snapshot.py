"""The live state of the kernel's modules, read-only: /proc/modules and /sys/module/<m>/*.

The loaded driver's version comes from /sys/module/nvidia/version, never from the file on disk
(`modinfo nvidia` reads whatever file modprobe would load now, which after a switch is the new one).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from .paths import Root

if TYPE_CHECKING:
    from pathlib import Path
from .rules import BOOTED_KERNEL_IMAGE, driver_closure, holders_closure, parse_proc_modules


class LoadedModule(NamedTuple):
    """A loaded module as /proc/modules and /sys/module show it."""

    name: str
    version: str | None
    srcversion: str | None
    refcnt: int
    holders: frozenset[str]        # modules that use this one (must be unloaded first)
    state: str                     # Live, Loading, Unloading (from /proc/modules)

    @property
    def kernel_users(self) -> int:
        """References that are not modules: open device files, fbcon, another driver's get."""
        return max(self.refcnt - len(self.holders), 0)


class Snapshot(NamedTuple):
    """The loaded modules, the kernel's release and whether loading is disabled, read at one moment."""

    kernel_release: str
    modules: dict[str, LoadedModule]
    modules_disabled: bool = False  # /proc/sys/kernel/modules_disabled: no load or unload until reboot
    # The kernel image the machine booted (NixOS: /run/booted-system/kernel, resolved), if known.
    booted_kernel_image: str | None = None

    def version(self, name: str) -> str | None:
        module = self.modules.get(name)
        return module.version if module else None

    def family(self) -> list[str]:
        """The loaded nvidia and, transitively, every module holding it: what a swap unloads."""
        return sorted(driver_closure({name: m.holders for name, m in self.modules.items()}))

    def holders_closure(self, names: set[str]) -> set[str]:
        """NAMES and, transitively, the loaded modules holding them."""
        return holders_closure({name: m.holders for name, m in self.modules.items()}, names)


def read_text(path: str | Path) -> str | None:
    """A small system file as text (undecodable bytes kept as surrogates, as kmod keeps bytes),
    stripped; None when it does not exist."""
    try:
        with open(path, "rb") as f:  # not Path.read_bytes: ~30 files per snapshot, two snapshots per swap
            return f.read().decode("utf-8", errors="surrogateescape").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_snapshot(root: Root) -> Snapshot:
    """/proc/modules for all modules; /sys/module details only for nvidia's closure (the no-op path
    runs on every start of nvidia-persistenced, and a machine has a hundred modules or more)."""
    release = read_text(root("/proc/sys/kernel/osrelease")) or ""
    rows = parse_proc_modules(read_text(root("/proc/modules")) or "")
    users = {name: u for name, (_, u) in rows.items()}
    closure = driver_closure(users)
    modules: dict[str, LoadedModule] = {}
    for name, (fields, holders) in rows.items():
        refcnt = int(fields[2]) if fields[2].lstrip("-").isdigit() else 0
        if name not in closure:
            modules[name] = LoadedModule(name, None, None, refcnt, holders, fields[4])
            continue
        sysdir = root(f"/sys/module/{name}")
        try:
            holders = frozenset(p.name for p in (sysdir / "holders").iterdir())
        except FileNotFoundError:
            pass
        sys_refcnt = read_text(sysdir / "refcnt")
        modules[name] = LoadedModule(
            name=name,
            version=read_text(sysdir / "version"),
            srcversion=read_text(sysdir / "srcversion"),
            refcnt=int(sys_refcnt) if sys_refcnt and sys_refcnt.lstrip("-").isdigit() else refcnt,
            holders=holders,
            state=fields[4],
        )
    disabled = read_text(root("/proc/sys/kernel/modules_disabled")) == "1"
    booted = root(BOOTED_KERNEL_IMAGE)
    image = os.path.realpath(booted) if os.path.lexists(booted) else None
    return Snapshot(kernel_release=release, modules=modules, modules_disabled=disabled, booted_kernel_image=image)
