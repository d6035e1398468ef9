"""After a load: wait until udev has made the device nodes, and check they point at the new driver.

NixOS's udev rules mknod /dev/nvidia* when the module's "add" uevent is processed. Such nodes
outlive an unload, so "the node exists" proves nothing: each node must have the device number the
loaded driver registered (nvidia-uvm's major is dynamic and may change across a reload). A stale node
is removed and the module's add event replayed so that the rules make it again.

Waiting: a UdevWatch (pyudev's Monitor on udev's netlink source, subscribed *before* the modules
are loaded, so that no event is missed) is told by udev when it has processed each module's add
event, i.e. after its RUN rules (the mknod) ran. Where there is no udev to listen to (no
/run/udev/control: a container, the test trees of the unit tests), or pyudev is missing, it
falls back to polling /run/udev/queue and the nodes every 20 ms.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, NamedTuple

from .paths import Root

if TYPE_CHECKING:
    from .effects import Effects

NV_MAJOR = 195


class Node(NamedTuple):
    """A device node the loaded driver should have: its path, the device number it registered, its module."""

    path: str
    major: int
    minor: int
    module: str


def char_majors(root: Root) -> dict[str, int]:
    """Character device names -> majors, from /proc/devices."""
    majors: dict[str, int] = {}
    section = None
    for line in root("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = line
            continue
        parts = line.split()
        if section == "Character devices:" and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(parts[1], int(parts[0]))
    return majors


def gpu_minors(root: Root) -> list[int]:
    minors = []
    for info in sorted(root("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text().splitlines():
            if line.startswith("Device Minor:"):
                minors.append(int(line.split(":", 1)[1]))
    return sorted(minors)


def expected_nodes(root: Root, loaded: set[str]) -> list[Node]:
    nodes: list[Node] = []
    if "nvidia" in loaded:
        nodes.append(Node("/dev/nvidiactl", NV_MAJOR, 255, "nvidia"))
        nodes += [Node(f"/dev/nvidia{m}", NV_MAJOR, m, "nvidia") for m in gpu_minors(root)]
    if "nvidia_modeset" in loaded:
        nodes.append(Node("/dev/nvidia-modeset", NV_MAJOR, 254, "nvidia_modeset"))
    if "nvidia_uvm" in loaded:
        major = char_majors(root).get("nvidia-uvm")
        if major is not None:
            nodes.append(Node("/dev/nvidia-uvm", major, 0, "nvidia_uvm"))
            nodes.append(Node("/dev/nvidia-uvm-tools", major, 1, "nvidia_uvm"))
    return nodes


def node_problem(root: Root, node: Node) -> str | None:
    try:
        st = os.stat(root(node.path))
    except FileNotFoundError:
        return f"{node.path} is missing"
    if not stat.S_ISCHR(st.st_mode):
        return f"{node.path} is not a character device"
    if (os.major(st.st_rdev), os.minor(st.st_rdev)) != (node.major, node.minor):
        return (f"{node.path} is {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, the driver registered "
                f"{node.major}:{node.minor}")
    return None


def udev_busy(root: Root) -> bool:
    """systemd-udevd keeps /run/udev/queue while events are queued (what `udevadm settle` waits for)."""
    return root("/run/udev/queue").exists()


NODE_MODULES = ("nvidia", "nvidia_modeset", "nvidia_uvm")  # the modules whose add event makes nodes

# Nodes that nvidia-modprobe makes, not udev (modprobe-utils/nvidia-modprobe-utils.h in
# NVIDIA/nvidia-modprobe: NV_CAP_DEVICE_NAME "/dev/nvidia-caps/nvidia-cap%d",
# NV_CAPS_IMEX_CHANNEL_DEVICE_NAME "/dev/nvidia-caps-imex-channels/channel%d"), with the dynamic
# major the driver registered under that name in /proc/devices (kernel-open/nvidia/nv-caps.c,
# nv-caps-imex.c). The minor is the capability's and survives a reload; the major may not. The
# same for NVSwitch and NVLink (NV_NVSWITCH_CTL_NAME "/dev/nvidia-nvswitchctl",
# NV_NVSWITCH_DEVICE_NAME "/dev/nvidia-nvswitch%d", NV_NVLINK_DEVICE_NAME "/dev/nvidia-nvlink",
# made by nvidia_nvswitch_mknod / nvidia_nvlink_mknod with the major of "nvidia-nvswitch" and
# "nvidia-nvlink" in /proc/devices). (directory, name prefix, /proc/devices name)
MODPROBE_NODES = (("/dev/nvidia-caps", "", "nvidia-caps"),
                  ("/dev/nvidia-caps-imex-channels", "", "nvidia-caps-imex-channels"),
                  ("/dev", "nvidia-nvswitch", "nvidia-nvswitch"),
                  ("/dev", "nvidia-nvlink", "nvidia-nvlink"))


class NodeFix(NamedTuple):
    """A node nvidia-modprobe made whose major is not the one the loaded driver registered."""

    path: str
    major: int | None  # the major to point at now; None: the driver no longer registers one
    minor: int
    was: int


def char_nodes(root: Root, directory: str) -> dict[str, tuple[int, int]]:
    """The character devices in DIRECTORY (not below it): path -> (major, minor)."""
    nodes = {}
    try:
        entries = list(os.scandir(root(directory)))
    except OSError:
        return {}
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            nodes[f"{directory}/{entry.name}"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return nodes


def modprobe_node_fixes(root: Root) -> list[NodeFix]:
    """Nodes of MODPROBE_NODES whose major is not the one the loaded driver registered."""
    majors = char_majors(root)
    fixes = []
    for directory, prefix, name in MODPROBE_NODES:
        want = majors.get(name)
        for path, (major, minor) in sorted(char_nodes(root, directory).items()):
            if not path.rpartition("/")[2].startswith(prefix):
                continue
            if major != want:
                fixes.append(NodeFix(path, want, minor, major))
    return fixes


def fix_modprobe_nodes(root: Root, effects: Effects) -> list[str]:
    """Points nvidia-modprobe's nodes at the loaded driver's majors (a node whose name the driver
    no longer registers is removed: nvidia-modprobe makes it again on demand); returns what was done."""
    done = []
    for fix in modprobe_node_fixes(root):
        if fix.major is None:
            effects.remove_node(fix.path)
            done.append(f"removed {fix.path} ({fix.was}:{fix.minor}, no such driver now)")
        else:
            effects.replace_node(fix.path, fix.major, fix.minor)
            done.append(f"{fix.path} {fix.was}:{fix.minor} -> {fix.major}:{fix.minor}")
    return done


class UdevWatch:
    """udev's processed "add" events of kernel modules, from the moment it is made."""

    def __init__(self, root: Root) -> None:
        self.monitor: Any = None  # a pyudev.Monitor
        self.seen: set[str] = set()
        if not root.is_live or not os.path.exists("/run/udev/control"):
            return  # no udevd here: wait_for_nodes polls
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
            monitor.filter_by(subsystem="module")
            monitor.start()
            self.monitor = monitor
        except (ImportError, OSError, ValueError):
            self.monitor = None

    def wait_added(self, modules: set[str], deadline: float) -> set[str]:
        """Waits until udev has processed the add event of each of MODULES (or DEADLINE);
        returns those it has not seen."""
        missing = set(modules) - self.seen
        while self.monitor is not None and missing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            device = self.monitor.poll(timeout=left)
            if device is None:
                break
            if device.action == "add":
                self.seen.add(device.sys_name)
                missing.discard(device.sys_name)
        return missing


def wait_for_nodes(root: Root, loaded: set[str], timeout: float, effects: Effects, poll: float = 0.02,
                   watch: UdevWatch | None = None, loaded_now: AbstractSet[str] = frozenset()) -> list[str]:
    """Waits until udev has settled and every expected node is right; returns what is still wrong.
    LOADED_NOW: modules loaded since WATCH was made, whose processed add events it waits for first.
    A node with another device number is removed and its module's add event replayed (EFFECTS)."""
    deadline = time.monotonic() + timeout
    # udev's word that it processed our modules' add events replaces waiting for its whole queue
    # to drain (/run/udev/queue), which other devices' events can keep busy for seconds.
    heard = (watch is not None and watch.monitor is not None
             and not watch.wait_added(set(loaded_now) & set(NODE_MODULES), deadline))
    replayed: set[str] = set()
    # What the loaded driver registered does not change while we wait: read it once, not per poll
    # (with 32 GPUs that is 33 files under /proc, and polls are 20 ms apart).
    expected: list[Node] | None = None
    while True:
        problems = []
        if not heard and udev_busy(root):
            problems = ["udev is still processing events"]
        else:
            if not expected:
                expected = expected_nodes(root, loaded)
            stale: dict[str, list[str]] = {}
            for node in expected:
                problem = node_problem(root, node)
                if problem is None:
                    continue
                problems.append(problem)
                if "registered" in problem and node.module not in replayed:
                    stale.setdefault(node.module, []).append(node.path)
            # Every stale node of a module goes before its add event is replayed: the rules run a
            # plain mknod per node, which fails (EEXIST) on any node still there.
            for module, paths in stale.items():
                for path in paths:
                    effects.remove_node(path)
                effects.replay_add(module)
                replayed.add(module)
            if not problems:
                return []
        if time.monotonic() >= deadline:
            return problems
        time.sleep(poll)
