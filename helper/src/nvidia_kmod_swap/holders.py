"""Who holds the GPU: processes with /dev/nvidia* open, or a DRM node of an NVIDIA GPU
(/dev/dri/card*, renderD*: a compositor or display manager, with nvidia_drm.modeset=1), and the
systemd units they belong to."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from .paths import Root
from .snapshot import read_text

DEVICE_PREFIXES = ("/dev/nvidia",)
DRM_CLASS = "/sys/class/drm"


def nvidia_drm_nodes(root: Root) -> frozenset[str]:
    """/dev/dri/<minor> of every DRM minor whose device is bound to an NVIDIA module: the real
    nvidia-drm registers its drm_device on the GPU's PCI device, bound to nvidia.ko, so
    /sys/class/drm/card<N>/device/driver/module is .../module/nvidia. An open DRM node pins
    nvidia_drm (f_op->owner) without any /dev/nvidia* fd."""
    try:
        names = os.listdir(root(DRM_CLASS))
    except OSError:
        return frozenset()
    nodes = set()
    for name in names:
        if not name.startswith(("card", "renderD")) or "-" in name:  # card0-HDMI-A-1: a connector
            continue
        try:
            module = os.path.basename(os.readlink(root(f"{DRM_CLASS}/{name}/device/driver/module")))
        except OSError:
            continue
        if module.startswith("nvidia"):
            nodes.add(f"/dev/dri/{name}")
    return frozenset(nodes)


class Holder(NamedTuple):
    """A process that holds the GPU (a /dev/nvidia* file or an NVIDIA GPU's DRM node open), and its systemd unit."""

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


def wait_until_released(root: Root, timeout: float, poll: float) -> bool:
    """Waits up to TIMEOUT seconds for no process to hold the GPU; whether none does."""
    deadline = time.monotonic() + timeout
    while find_holders(root):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def find_holders(root: Root) -> list[Holder]:
    holders: list[Holder] = []
    drm_nodes = nvidia_drm_nodes(root)
    # Plain strings, not Path objects: this reads every process's every fd (hundreds of readlinks).
    proc = str(root("/proc"))
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fd_dir = f"{proc}/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        seen: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (target.startswith(DEVICE_PREFIXES) or target in drm_nodes) and target not in seen:
                seen.add(target)
        if not seen:
            continue
        try:
            comm = read_text(f"{proc}/{entry.name}/comm")
        except OSError:
            comm = None
        try:
            cgroup = read_text(f"{proc}/{entry.name}/cgroup")
        except OSError:
            cgroup = None
        unit = unit_of(cgroup) if cgroup is not None else None
        if comm is None:  # the process is gone, or not ours to read
            comm = "?"
        holders.extend(Holder(pid, comm, path, unit) for path in sorted(seen))
    return sorted(holders, key=lambda h: (h.pid, h.path))
