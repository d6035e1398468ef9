"""Who holds the GPU: processes with /dev/nvidia* open, and the systemd units they belong to."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .paths import Root

DEVICE_PREFIXES = ("/dev/nvidia",)


@dataclass(frozen=True)
class Holder:
    pid: int
    comm: str
    path: str
    unit: str | None

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}) holds {self.path}" + (f" [{self.unit}]" if self.unit else "")


def unit_of(cgroup_text: str) -> str | None:
    """The innermost systemd unit in /proc/<pid>/cgroup (cgroup v2 line, or v1 name=systemd)."""
    for line in cgroup_text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers not in ("", "name=systemd"):
            continue
        for part in reversed(path.strip("/").split("/")):
            if part.endswith((".service", ".scope")):
                return part
    return None


def find_holders(root: Root) -> list[Holder]:
    holders: list[Holder] = []
    proc = root("/proc")
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fd_dir = proc / entry.name / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        seen: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith(DEVICE_PREFIXES) and target not in seen:
                seen.add(target)
        if not seen:
            continue
        try:
            comm = (proc / entry.name / "comm").read_text().strip()
        except OSError:
            comm = "?"
        try:
            unit = unit_of((proc / entry.name / "cgroup").read_text())
        except OSError:
            unit = None
        holders.extend(Holder(pid, comm, path, unit) for path in sorted(seen))
    return sorted(holders, key=lambda h: (h.pid, h.path))
