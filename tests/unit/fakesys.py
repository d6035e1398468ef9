"""The unit tests' fakes: a fake system tree (/proc, /sys, /dev, /etc, /run) and real ELF module files.

`FakeSystem` keeps the kernel's module table and writes it out as /proc/modules and /sys/module/*,
exactly in the formats the kernel uses, so the helper reads it with its real code. `FakeEffects`
is the `effects.Effects` the swap tests inject: it refuses what the kernel refuses (a module already
loaded, one in use, a vermagic for another kernel, unknown symbols) and can fail or "crash" on
any step.
"""

from __future__ import annotations

import errno
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from nvidia_kmod_swap.cli import main  # noqa: E402
from nvidia_kmod_swap.config import Config, parse  # noqa: E402
from nvidia_kmod_swap.effects import EffectError, KmodError, SystemEffects  # noqa: E402
from nvidia_kmod_swap.journal import Reporter  # noqa: E402
from nvidia_kmod_swap.modinfo import read_modinfo  # noqa: E402
from nvidia_kmod_swap.paths import Root  # noqa: E402
from nvidia_kmod_swap.swap import Swapper  # noqa: E402

RELEASE = "6.1.0-56-amd64"
OLD, NEW = "570.124.04", "570.133.07"
# The four modules a driver loads, all new and all old: what the tests compare sysfs with.
FULL = {"nvidia": NEW, "nvidia_drm": NEW, "nvidia_modeset": NEW, "nvidia_uvm": NEW}
BEFORE = {"nvidia": OLD, "nvidia_drm": OLD, "nvidia_modeset": OLD, "nvidia_uvm": OLD}
DRIVER = {"nvidia": (), "nvidia_modeset": ("nvidia",), "nvidia_uvm": ("nvidia",),
          "nvidia_drm": ("nvidia_modeset", "nvidia"), "nvidia_peermem": ("nvidia",)}


def elf_object(modinfo: dict[str, str], body: bytes = b"\x90" * 64, *, bits: int = 64, endian: str = "<") -> bytes:
    """A minimal ELF relocatable object with .text, .modinfo and .shstrtab, like a .ko: ELF64 as on
    x86_64 and aarch64, or ELF32 (an i686 kernel's modules; nixpkgs' nvidia-x11 generic.nix lists
    i686-linux for drivers that ship a 32-bit build); ENDIAN "<" little, ">" big."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.text\0.modinfo\0.shstrtab\0"
    ehsize, shentsize = (64, 64) if bits == 64 else (52, 40)
    text_off = ehsize
    info_off = text_off + len(body)
    shstr_off = info_off + len(info)
    sh_off = (shstr_off + len(shstr) + 7) & ~7
    header = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1 if endian == "<" else 2, 1, 0]) + b"\0" * 8
    machine = 62 if bits == 64 else 3  # EM_X86_64, EM_386
    address = "Q" if bits == 64 else "I"
    header += struct.pack(f"{endian}HHI{address}{address}{address}IHHHHHH", 1, machine, 1, 0, 0, sh_off, 0,
                          ehsize, 0, 0, shentsize, 4, 3)
    data = bytearray(header + body + info + shstr)
    data += b"\0" * (sh_off - len(data))

    def section(name: int, stype: int, offset: int, size: int) -> bytes:
        if bits == 64:
            return struct.pack(f"{endian}IIQQQQIIQQ", name, stype, 0, 0, offset, size, 0, 0, 1, 0)
        return struct.pack(f"{endian}IIIIIIIIII", name, stype, 0, 0, offset, size, 0, 0, 1, 0)

    data += section(0, 0, 0, 0)
    data += section(1, 1, text_off, len(body))
    data += section(7, 1, info_off, len(info))
    data += section(16, 3, shstr_off, len(shstr))
    return bytes(data)


def write_ko(directory: Path, name: str, version: str | None, *, release: str = RELEASE,
             depends: tuple[str, ...] | None = None, compression: str = "") -> Path:
    depends = DRIVER.get(name, ()) if depends is None else depends
    fields = {"name": name, "vermagic": f"{release} SMP preempt mod_unload modversions ",
              "depends": ",".join(depends), "srcversion": f"SRC{name}{version}".upper()[:23]}
    if version is not None:
        fields["version"] = version
    data = elf_object(fields)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name.replace("_", "-") + ".ko")
    if compression == "xz":
        path = path.with_name(path.name + ".xz")
        data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif compression == "zst":
        import zstandard

        path = path.with_name(path.name + ".zst")
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_driver(store: Path, version: str, *, modules=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem"),
                 layout: str = "misc", release: str = RELEASE, compression: str = "") -> Path:
    """A driver package tree like nvidia_x11.bin; returns its lib/modules/<release> directory."""
    flavour = "open" if layout != "misc" else "x11"
    top = store / f"{abs(hash(version + layout + compression)) % 10**8:08d}-nvidia-{flavour}-{version}-{release}"
    module_dir = top / "lib/modules" / release
    sub = module_dir / ("misc" if layout == "misc" else "kernel/drivers/video")
    for name in modules:
        write_ko(sub, name, version, release=release, compression=compression)
    return module_dir


@dataclass
class Module:
    name: str
    version: str | None
    srcversion: str | None
    uses: tuple[str, ...]
    params: str = ""
    refcnt_extra: int = 0  # open files and other non-module users


@dataclass
class FakeSystem:
    base: Path
    release: str = RELEASE
    modules: dict[str, Module] = field(default_factory=dict)
    nodes: dict[str, tuple[int, int]] = field(default_factory=dict)  # what udev has made in /dev
    uvm_major: int = 510
    # nvidia-caps' dynamic major (kernel-open/nvidia/nv-caps.c alloc_chrdev_region): a test that
    # reloads nvidia changes it, as another driver's major taken meanwhile does on a real machine.
    caps_major: int = 509
    # firmware_class.path (the built-in firmware loader's parameter), as NixOS activation writes it
    firmware_path: str = ""
    gpus: int = 1
    modules_disabled: bool = False

    def __post_init__(self) -> None:
        (self.base / "proc/sys/kernel").mkdir(parents=True, exist_ok=True)
        (self.base / "proc/sys/kernel/osrelease").write_text(self.release + "\n")
        (self.base / "proc/cmdline").write_text("BOOT_IMAGE=/bzImage root=/dev/vda ro\n")
        (self.base / "etc/modprobe.d").mkdir(parents=True, exist_ok=True)
        (self.base / "dev").mkdir(exist_ok=True)
        (self.base / "run").mkdir(exist_ok=True)
        self.sync()

    @property
    def root(self) -> Root:
        return Root(self.base)

    def holders(self, name: str) -> list[str]:
        return sorted(m.name for m in self.modules.values() if name in m.uses)

    def add(self, name: str, version: str | None, uses: tuple[str, ...] | None = None, srcversion: str | None = None,
            params: str = "") -> None:
        uses = DRIVER.get(name, ()) if uses is None else uses
        src = srcversion if srcversion is not None else f"SRC{name}{version}".upper()[:23]
        self.modules[name] = Module(name, version, src, tuple(uses), params)
        if name == "nvidia":
            self.nodes["/dev/nvidiactl"] = (195, 255)
            for minor in range(self.gpus):
                self.nodes[f"/dev/nvidia{minor}"] = (195, minor)
        if name == "nvidia_modeset":
            self.nodes["/dev/nvidia-modeset"] = (195, 254)
        if name == "nvidia_uvm":
            self.nodes.setdefault("/dev/nvidia-uvm", (self.uvm_major, 0))
            self.nodes.setdefault("/dev/nvidia-uvm-tools", (self.uvm_major, 1))
        self.sync()

    def udev_add(self, module: str) -> None:
        """NixOS's 60-nvidia.rules (nixos/modules/hardware/video/nvidia.nix) run a plain `mknod` on
        the module's add event: it fails with EEXIST when a node is there, so a stale node stays
        unless it was removed first."""
        if module == "nvidia_uvm":
            self.nodes.setdefault("/dev/nvidia-uvm", (self.uvm_major, 0))
            self.nodes.setdefault("/dev/nvidia-uvm-tools", (self.uvm_major, 1))
            self.sync()

    def modprobe_confs(self) -> list[Path]:
        """The modprobe.d files kmod reads (libkmod.c default_config_paths), as modprobe would."""
        return sorted(p for d in ("etc/modprobe.d", "run/modprobe.d", "lib/modprobe.d")
                      for p in (self.base / d).glob("*.conf"))

    def nvidia_modprobe_caps(self, *minors: int) -> None:
        """nvidia-modprobe -f /proc/driver/nvidia/capabilities/...: mknod /dev/nvidia-caps/nvidia-cap<minor>
        with the major /proc/devices shows for nvidia-caps (modprobe-utils/nvidia-modprobe-utils.c
        nvidia_cap_mknod); udev never touches these."""
        for minor in minors:
            self.nodes[f"/dev/nvidia-caps/nvidia-cap{minor}"] = (self.caps_major, minor)
        self.sync()

    def load_driver(self, version: str, names=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")) -> None:
        for name in names:
            self.add(name, version)

    def remove(self, name: str) -> None:
        del self.modules[name]
        if name == "nvidia":
            self.caps_major -= 1  # the next load gets another dynamic major (hostile: always)
        self.sync()

    def sync(self) -> None:
        """Writes /proc/modules, /sys/module/*, /proc/devices and /proc/driver/nvidia as the kernel shows them,
        and NODES as real character devices under dev/ when this process may mknod (root)."""
        self._sync_nodes()
        lines = []
        sysmod = self.base / "sys/module"
        shutil.rmtree(sysmod, ignore_errors=True)
        sysmod.mkdir(parents=True)
        for m in self.modules.values():
            holders = self.holders(m.name)
            refcnt = len(holders) + m.refcnt_extra
            lines.append(f"{m.name} 16384 {refcnt} {','.join(holders) + ',' if holders else '-'} Live 0x0000000000000000 (OE)")
            d = sysmod / m.name
            (d / "holders").mkdir(parents=True)
            for h in holders:
                (d / "holders" / h).symlink_to(f"../../{h}")
            if m.version is not None:
                (d / "version").write_text(m.version + "\n")
            if m.srcversion:
                (d / "srcversion").write_text(m.srcversion + "\n")
            (d / "refcnt").write_text(f"{refcnt}\n")
            (d / "initstate").write_text("live\n")
        (self.base / "proc/modules").write_text("".join(line + "\n" for line in lines))
        self._sync_drm()
        (sysmod / "firmware_class/parameters").mkdir(parents=True)
        (sysmod / "firmware_class/parameters/path").write_text(self.firmware_path + "\n")
        (self.base / "proc/sys/kernel/modules_disabled").write_text("1\n" if self.modules_disabled else "0\n")
        devices_text = "Character devices:\n  1 mem\n  4 tty\n"
        if "nvidia" in self.modules:
            devices_text += f"195 nvidia-frontend\n{self.caps_major} nvidia-caps\n"
        if "nvidia_uvm" in self.modules:
            devices_text += f"{self.uvm_major} nvidia-uvm\n"
        devices_text += "\nBlock devices:\n  8 sd\n"
        (self.base / "proc/devices").write_text(devices_text)
        gpus = self.base / "proc/driver/nvidia/gpus"
        shutil.rmtree(self.base / "proc/driver", ignore_errors=True)
        if "nvidia" in self.modules:
            for minor in range(self.gpus):
                d = gpus / f"0000:{minor + 1:02x}:00.0"
                d.mkdir(parents=True)
                (d / "information").write_text(f"Model: \t\t Fake\nDevice Minor: \t {minor}\n")

    def _sync_drm(self) -> None:
        """/sys/class/drm as the kernel shows it: an integrated GPU's card1 (i915), and with
        nvidia_drm.modeset=1 the NVIDIA one (nvidia-drm-drv.c registers a drm_device on the GPU,
        whose driver is an NVIDIA module), plus a connector entry of each, which is no node."""
        drm = self.base / "sys/class/drm"
        shutil.rmtree(drm, ignore_errors=True)
        cards = {"card1": "i915"}
        drm_module = self.modules.get("nvidia_drm")
        if drm_module is not None and "modeset=1" in drm_module.params.split():
            cards["card0"] = "nvidia"
        for card, module in cards.items():
            driver = drm / card / "device/driver"
            driver.mkdir(parents=True)
            (driver / "module").symlink_to(f"../../../../module/{module}")
            (drm / f"{card}-DP-1").mkdir()

    @property
    def real_nodes(self) -> bool:
        """Whether dev/ holds real device nodes (mknod needs CAP_MKNOD: root, not a Nix build sandbox)."""
        if not hasattr(self, "_real_nodes"):
            probe = self.base / "dev/.probe"
            try:
                os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(1, 3))
                probe.unlink()
                self._real_nodes = True
            except OSError:
                self._real_nodes = False
        return self._real_nodes

    def _sync_nodes(self) -> None:
        if not self.real_nodes:
            return
        dev = self.base / "dev"
        for entry in sorted(dev.rglob("*"), reverse=True):
            path = "/" + str(entry.relative_to(self.base))
            st = os.lstat(entry)
            if stat.S_ISDIR(st.st_mode):
                continue
            if path not in self.nodes or (os.major(st.st_rdev), os.minor(st.st_rdev)) != self.nodes[path]:
                entry.unlink()
        for path, (major, minor) in self.nodes.items():
            target = self.base / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(target):
                os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(major, minor))

    def change(self, name: str, **attrs: object) -> None:
        """Gives the loaded module NAME other attributes (version, srcversion, refcnt_extra), as
        /proc and /sys then show them."""
        for key, value in attrs.items():
            setattr(self.modules[name], key, value)
        self.sync()

    def versions(self) -> dict[str, str | None]:
        return {n: m.version for n, m in sorted(self.modules.items())}

    def hold_device(self, pid: int, comm: str, unit: str | None, path: str = "/dev/nvidia0", module: str = "nvidia") -> None:
        """A process with the device open: /proc/<pid>/fd link, and a reference on MODULE (the
        owner of the node's file operations: nvidia, or nvidia_drm for /dev/dri/card*)."""
        proc = self.base / "proc" / str(pid)
        (proc / "fd").mkdir(parents=True, exist_ok=True)
        (proc / "fd" / "3").symlink_to(path)
        (proc / "comm").write_text(comm + "\n")
        (proc / "cgroup").write_text(f"0::/system.slice/{unit}\n" if unit else "0::/user.slice/user-1000.slice/session-2.scope\n")
        (proc / "module").write_text(module)  # not in /proc: which reference release_device drops
        if module in self.modules:
            self.modules[module].refcnt_extra += 1
        self.sync()

    def release_device(self, pid: int) -> None:
        module = (self.base / "proc" / str(pid) / "module").read_text()
        shutil.rmtree(self.base / "proc" / str(pid))
        if module in self.modules:
            self.modules[module].refcnt_extra -= 1
        self.sync()


class Crash(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the helper catches it."""


@dataclass
class FakeEffects:
    """The helper's effects.Effects over a FakeSystem, refusing what the kernel refuses
    (kernel/module/main.c): EEXIST for a loaded name, EAGAIN (O_NONBLOCK delete_module) while a
    module has holders or other references, ENOEXEC for another kernel's vermagic, ENOENT for
    missing symbols (a dependency not loaded), EPERM everywhere once modules_disabled is 1.

    FAIL_ON (op, name) fails once (a flaky step); ALWAYS_FAIL (op, name or path) -> errno fails
    every time, as the kernel does for a bad file or a module someone keeps open.
    """

    system: FakeSystem
    fail_on: set[tuple[str, str]] = field(default_factory=set)
    always_fail: dict[tuple[str, str], int] = field(default_factory=dict)
    crash_at_call: int | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    systemctl_calls: list[list[str]] = field(default_factory=list)
    on_systemctl: object = None          # called with the args, e.g. to let a holder go
    command_output: tuple[int, str] | tuple[int, str, str] | None = None  # the verify command's (status, stdout[, stderr])
    # A process opening /dev/nvidiactl all the time: whenever nvidia is gone, the kernel runs
    # `modprobe char-major-195-255` (nvidia.ko's MODULE_ALIAS_CHARDEV_MAJOR(195), kernel-open/nvidia/nv.c)
    # and modprobe loads this file (the booted driver), unless a modprobe.d `install nvidia ...` line
    # in /run/modprobe.d (kmod's libkmod.c default_config_paths) says otherwise.
    autoload_from: Path | None = None
    autoloads: int = 0

    def _enter(self, op: str, name: str, path: str = "") -> None:
        self.calls.append((op, name))
        if self.crash_at_call is not None and len(self.calls) - 1 == self.crash_at_call:
            raise Crash(f"crash at {op} {name}")
        if self.system.modules_disabled:
            raise KmodError(op, name, errno.EPERM)
        for key in ((op, name), (op, path)):
            if key in self.always_fail:
                raise KmodError(op, name, self.always_fail[key])
        if (op, name) in self.fail_on:
            self.fail_on.discard((op, name))
            raise KmodError(op, name, errno.ENODEV)

    def load(self, path: str, params: str) -> None:
        info = read_modinfo(Path(path))
        self._enter("load", info.name, path)
        if info.name in self.system.modules:
            raise KmodError("load", path, errno.EEXIST)
        if info.kernel_release != self.system.release:
            raise KmodError("load", path, errno.ENOEXEC)
        for dep in info.depends:
            if dep not in self.system.modules:
                raise KmodError("load", path, errno.ENOENT)
        self.system.add(info.name, info.version, info.depends, info.srcversion, params)

    def unload(self, name: str) -> None:
        self._enter("unload", name)
        module = self.system.modules.get(name)
        if module is None:
            raise KmodError("unload", name, errno.ENOENT)
        if self.system.holders(name) or module.refcnt_extra:
            raise KmodError("unload", name, errno.EAGAIN)
        self.system.remove(name)
        self._opener_autoloads()

    def _opener_autoloads(self) -> None:
        if self.autoload_from is None or "nvidia" in self.system.modules:
            return
        # kmod runs the first `install nvidia` line in file-name order (libkmod-config.c sorts the
        # files of all modprobe.d directories by name; libkmod-module.c takes the first command):
        # `false` blocks the load, an insmod of a file loads that file.
        source = self.autoload_from
        for conf in sorted(self.system.modprobe_confs(), key=lambda p: p.name):
            words = next((line.split() for line in conf.read_text().splitlines()
                          if line.split()[:2] == ["install", "nvidia"]), None)
            if words is None:
                continue
            insmod = next((i for i, w in enumerate(words) if w.endswith("/insmod")), None)
            if insmod is None:
                return
            source = Path(words[insmod + 1])
            break
        info = read_modinfo(source)
        self.system.add(info.name, info.version, info.depends, info.srcversion)
        self.autoloads += 1

    def load_by_name(self, name: str) -> None:
        self._enter("modprobe", name)
        self.system.add(name, None, ())

    def remove_node(self, path: str) -> None:
        self.system.nodes.pop(path, None)
        self.system.sync()

    def replay_add(self, module: str) -> None:
        self.system.udev_add(module)  # udev's rules mknod the module's nodes again

    def replace_node(self, path: str, major: int, minor: int) -> None:
        if path not in self.system.nodes:
            raise FileNotFoundError(path)
        self.system.nodes[path] = (major, minor)
        self.system.sync()

    def block_autoload(self, modules: list[str]) -> None:
        SystemEffects(self.system.root).block_autoload(modules)  # a file write: the real one

    def route_by_name(self, text: str | None) -> None:
        SystemEffects(self.system.root).route_by_name(text)  # a file write: the real one

    def set_firmware_path(self, path: str) -> None:
        self.system.firmware_path = path
        self.system.sync()

    def unblock_autoload(self) -> None:
        SystemEffects(self.system.root).unblock_autoload()
        self._opener_autoloads()

    def systemctl(self, args: list[str]) -> None:
        self.systemctl_calls.append(list(args))
        if callable(self.on_systemctl):
            self.on_systemctl(args)

    slurm: FakeSlurm | None = None  # slurmctld, asked through scontrol

    def run_command(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        if self.slurm is not None and argv[0].endswith("/scontrol"):
            return self.slurm.scontrol(argv[1:])
        if self.command_output is not None:
            status, out, *err = self.command_output
            return status, out, err[0] if err else ""
        import subprocess

        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def set_gc_roots(self, directory: str, targets: dict[str, str]) -> None:
        import os

        top = self.system.root(directory)
        top.mkdir(parents=True, exist_ok=True)
        for entry in top.iterdir():
            entry.unlink()
        for name, target in targets.items():
            os.symlink(target, top / name)

    # The driver links: the real file writes, and the real systemd-tmpfiles (--root=the fake tree):
    # which rule wins for a path is systemd's to say, not ours (src/tmpfiles/tmpfiles.c).
    tmpfiles_calls: list[list[str]] = field(default_factory=list)

    def set_pin_rules(self, text: str | None) -> None:
        SystemEffects(self.system.root).set_pin_rules(text)

    def apply_tmpfiles(self, paths: list[str]) -> None:
        self.tmpfiles_calls.append(list(paths))
        tool = shutil.which("systemd-tmpfiles")  # the Nix build's (nativeCheckInputs), or the host's
        argv = [tool or "systemd-tmpfiles", f"--root={self.system.base}", "--create", *(f"--prefix={p}" for p in paths)]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode not in (0, 65):
            raise EffectError(f"systemd-tmpfiles: {proc.stderr.strip()}")

    def set_link(self, path: str, target: str | None) -> None:
        SystemEffects(self.system.root).set_link(path, target)


@dataclass
class SlurmNodeState:
    base: str = "IDLE"          # IDLE, ALLOCATED, MIXED, DOWN
    drain: bool = False
    reason: str = ""
    reason_user: str = ""
    reason_time: str = ""
    partitions: tuple[str, ...] = ("gpu",)


@dataclass
class FakeSlurm:
    """slurmctld through scontrol, as far as fleet.py reaches it: `--oneliner show node`, and
    `update NodeName= State=DRAIN Reason=` / `State=RESUME` (src/scontrol/update_node.c and
    slurmctld's node_mgr.c update_node: a drain needs a reason and records who and when; a resume
    of a node that is not drained or down is refused; a resume clears the reason). DOWN: slurmctld
    does not answer, every call fails as scontrol does then. UNKNOWN: slurmctld started and the
    node's slurmd has not registered since (jobs on it are not shown)."""

    nodes: dict[str, SlurmNodeState] = field(default_factory=dict)
    clock: int = 1_800_000_000
    down: bool = False
    calls: list[list[str]] = field(default_factory=list)
    on_call: object = None  # called with the args before they take effect (another node acting meanwhile)

    def drain(self, name: str, reason: str, user: str = "root") -> None:
        node = self.nodes[name]
        self.clock += 1
        node.drain, node.reason, node.reason_user = True, reason, user
        node.reason_time = time_str(self.clock)

    def scontrol(self, args: list[str]) -> tuple[int, str, str]:
        self.calls.append(list(args))
        if callable(self.on_call):
            self.on_call(args)
        if self.down:
            return 1, "", "slurm_load_node error: Unable to contact slurm controller (connect failure)\n"
        if args == ["--oneliner", "show", "node"]:
            return 0, "".join(self._line(name, node) for name, node in self.nodes.items()), ""
        if args[:1] == ["update"]:
            fields = dict(a.split("=", 1) for a in args[1:])
            node = self.nodes.get(fields.get("NodeName", ""))
            if node is None:
                return 1, "", "slurm_update error: Invalid node name specified\n"
            state = fields.get("State", "").upper()
            if state == "DRAIN":
                if not fields.get("Reason"):
                    return 1, "", "You must specify a reason when DOWNING or DRAINING a node. Request denied\n"
                self.drain(fields["NodeName"], fields["Reason"])
                return 0, "", ""
            if state == "RESUME":
                if node.base == "UNKNOWN" and node.drain:
                    # Not registered since slurmctld started: update_node clears DRAIN, then has no
                    # state to set for UNKNOWN and fails (node_mgr.c, Slurm 22.05 to 25.05).
                    node.drain = False
                    return 1, "", "slurm_update error: Invalid node state specified\n"
                if not node.drain and node.base != "DOWN":
                    return 1, "", "slurm_update error: Invalid node state specified\n"
                node.drain, node.reason, node.reason_user, node.reason_time = False, "", "", ""
                return 0, "", ""
        return 1, "", f"scontrol: unexpected arguments {args}\n"

    @staticmethod
    def _line(name: str, node: SlurmNodeState) -> str:
        state = node.base + ("+DRAIN" if node.drain else "")
        reason = f" Reason={node.reason} [{node.reason_user}@{node.reason_time}]" if node.drain else ""
        return (f"NodeName={name} Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=1 Gres=gpu:1 "
                f"NodeAddr={name} NodeHostName={name} State={state} ThreadsPerCore=1 Partitions={','.join(node.partitions)} "
                f"BootTime=None SlurmdStartTime=None{reason} Comment=(null)\n")


def time_str(epoch: int) -> str:
    """slurm_make_time_str's default format (ISO 8601, local time)."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def make_config(store: Path, module_dirs: list[Path], rollback_dirs: list[Path] = (), **overrides) -> dict:
    config = {
        "driver_version": NEW,
        "kernel_release": RELEASE,
        "module_dirs": [str(d) for d in module_dirs],
        "rollback_dirs": [str(d) for d in rollback_dirs],
        "state_dir": "/run/nvidia-kmod-swap",
        "settle_timeout_s": 0.2,
        "busy_grace_s": 0,  # tests of transient holders set their own
        "allowed_prefixes": [str(store) + "/"],
    }
    config.update(overrides)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def config_for(store: Path, trees: tuple[Path, Path], **overrides) -> Config:
    """The parsed config of a swap from TREES[0] (the rollback tree) to TREES[1]."""
    return parse(make_config(store, [trees[1]], [trees[0]], **overrides))


def swapper(system: FakeSystem, config: Config, effects: FakeEffects | None = None, **kw) -> Swapper:
    return Swapper(system.root, config, effects or FakeEffects(system), Reporter("stderr"), **kw)


def cli(system: FakeSystem, store: Path, trees: tuple[Path, Path], tmp_path: Path, *args: str,
        effects: FakeEffects | None = None, **overrides) -> int:
    """The CLI over SYSTEM with the config of config_for, written to TMP_PATH."""
    path = write_config(tmp_path / "config.json", make_config(store, [trees[1]], [trees[0]], **overrides))
    return main(["--root", str(system.base), "--config", str(path), "--log-target", "stderr", *args], effects=effects)
