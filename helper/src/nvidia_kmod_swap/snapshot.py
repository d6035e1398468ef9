"""The live state of the kernel's modules, read-only: /proc/modules and /sys/module/<m>/*.

The loaded driver's version comes from /sys/module/nvidia/version, never from the file on disk
(`modinfo nvidia` reads whatever file modprobe would load now, which after a switch is the new one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .paths import Root


@dataclass(frozen=True)
class LoadedModule:
    name: str
    version: str | None
    srcversion: str | None
    refcnt: int
    holders: frozenset[str]        # modules that use this one (must be unloaded first)
    state: str                     # Live, Loading, Unloading (from /proc/modules)


@dataclass(frozen=True)
class Snapshot:
    kernel_release: str
    modules: dict[str, LoadedModule] = field(default_factory=dict)

    def version(self, name: str) -> str | None:
        module = self.modules.get(name)
        return module.version if module else None

    def family(self) -> list[str]:
        """Loaded NVIDIA modules and, transitively, every module that holds one of them."""
        return sorted(nvidia_family({name: m.holders for name, m in self.modules.items()}))


def nvidia_family(holders: dict[str, frozenset[str]]) -> set[str]:
    """The loaded modules named nvidia* and, transitively, every module holding one of them."""
    todo = [name for name in holders if name.startswith("nvidia")]
    family: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in family and name in holders:
            family.add(name)
            todo.extend(holders[name])
    return family


def _read(path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_snapshot(root: Root) -> Snapshot:
    """/proc/modules for all modules; /sys/module details only for the NVIDIA family (the no-op path
    runs on every start of nvidia-persistenced, and a machine has a hundred modules or more)."""
    release = _read(root("/proc/sys/kernel/osrelease")) or ""
    rows: dict[str, list[str]] = {}
    for line in root("/proc/modules").read_text().splitlines():
        fields = line.split()  # name size refcount users state address
        if len(fields) >= 5:
            rows[fields[0]] = fields
    users = {name: frozenset(u for u in f[3].strip(",").split(",") if u and u != "-") for name, f in rows.items()}
    family = nvidia_family(users)
    modules: dict[str, LoadedModule] = {}
    for name, fields in rows.items():
        refcnt = int(fields[2]) if fields[2].lstrip("-").isdigit() else 0
        if name not in family:
            modules[name] = LoadedModule(name, None, None, refcnt, users[name], fields[4])
            continue
        sysdir = root(f"/sys/module/{name}")
        try:
            holders = frozenset(p.name for p in (sysdir / "holders").iterdir())
        except FileNotFoundError:
            holders = users[name]
        sys_refcnt = _read(sysdir / "refcnt")
        modules[name] = LoadedModule(
            name=name,
            version=_read(sysdir / "version"),
            srcversion=_read(sysdir / "srcversion"),
            refcnt=int(sys_refcnt) if sys_refcnt and sys_refcnt.lstrip("-").isdigit() else refcnt,
            holders=holders,
            state=fields[4],
        )
    return Snapshot(kernel_release=release, modules=modules)


def read_nvidia_only(root: Root) -> tuple[str, str | None]:
    """The fast path: (running kernel release, loaded nvidia version or None), two small reads."""
    release = _read(root("/proc/sys/kernel/osrelease")) or ""
    return release, _read(root("/sys/module/nvidia/version"))
