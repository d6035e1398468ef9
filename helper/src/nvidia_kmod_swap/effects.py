"""The helper's one effects boundary: everything that changes the system goes through an Effects.

- kernel modules: load a file by absolute path (finit_module/init_module), unload by name
  (delete_module), load a kernel module by name (modprobe, for drm and the like);
- device nodes: remove a stale node, replay a module's "add" uevent so udev makes it again,
  replace a node nvidia-modprobe made (nvidia-caps) with one of the new major;
- firmware: the firmware loader's search path, for the driver about to initialise a GPU;
- module autoload: a modprobe.d file that keeps the kernel and nvidia-modprobe from loading the
  booted driver while none is loaded, and one that routes later loads by name to the loaded
  driver's files (byname.py);
- systemd units: systemctl stop/start;
- the verify command;
- the Nix GC roots that keep the loaded driver's files;
- the driver links' pin (userspace.py): a runtime tmpfiles rule, applied by systemd-tmpfiles
  itself, and the link to the loaded driver's tools.

Real syscalls through libc's syscall(2), no shell and no modprobe search path: the exact file the
plan names is the one the kernel gets. Compressed modules are decompressed here, as kmod does,
because not every kernel decompresses in-kernel. Tests replace SystemEffects with one fake.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from pathlib import Path
from typing import Protocol

from .byname import BY_NAME_RULES
from .modinfo import COMPRESSED, read_bytes
from .paths import Root
from .rules import AUTOLOAD_BLOCK, FIRMWARE_PATH, PIN_RULES

SYSCALLS = {
    "x86_64": {"init_module": 175, "delete_module": 176, "finit_module": 313},
    "aarch64": {"init_module": 105, "delete_module": 106, "finit_module": 273},
}

EXPLAIN = {
    errno.EEXIST: "a module of that name is already loaded",
    errno.EBUSY: "the module is in use",
    errno.EAGAIN: "the module is in use (held by another module or an open device)",
    errno.EWOULDBLOCK: "the module is in use (held by another module or an open device)",
    errno.ENOEXEC: "invalid module format (built for another kernel?)",
    errno.ENOENT: "unknown symbol or module not loaded",
    errno.EKEYREJECTED: "the module signature was rejected",
    errno.EPERM: "not permitted (lockdown, or module loading disabled)",
    errno.EINVAL: "invalid parameters or module",
    errno.ENODEV: "the module's init found no device",
}


class EffectError(Exception):
    """A change the system refused."""


class KmodError(EffectError):
    def __init__(self, op: str, target: str, err: int, detail: str = "") -> None:
        self.op, self.target, self.errno = op, target, err
        text = detail or EXPLAIN.get(err) or os.strerror(err)
        super().__init__(f"{op} {target}: {os.strerror(err)} ({text})" if err else f"{op} {target}: {text}")


class Effects(Protocol):
    def load(self, path: str, params: str) -> None: ...
    def unload(self, name: str) -> None: ...
    def load_by_name(self, name: str) -> None: ...
    def remove_node(self, path: str) -> None: ...
    def replay_add(self, module: str) -> None: ...
    def replace_node(self, path: str, major: int, minor: int) -> None: ...
    def block_autoload(self, modules: list[str]) -> None: ...
    def set_firmware_path(self, path: str) -> None: ...
    def unblock_autoload(self) -> None: ...
    def route_by_name(self, text: str | None) -> None: ...
    def systemctl(self, args: list[str]) -> None: ...
    def run_command(self, argv: list[str], timeout: float) -> tuple[int, str, str]: ...
    def set_gc_roots(self, directory: str, targets: dict[str, str]) -> None: ...
    def set_pin_rules(self, text: str | None) -> None: ...
    def apply_tmpfiles(self, paths: list[str]) -> None: ...
    def set_link(self, path: str, target: str | None) -> None: ...


# kmod's tools, first where NixOS has them: /run/current-system/sw/bin outlives any one generation's
# store path, which a garbage collection may remove while a modprobe.d line still names it.
KMOD_DIRS = ("/run/current-system/sw/bin", "/usr/sbin", "/sbin")


def kmod_tool(name: str) -> str:
    """The path of kmod's NAME (modprobe, insmod): the first that exists, else NixOS's (modprobe.nix
    puts kmod in environment.systemPackages), which a modprobe.d line may name before it exists."""
    candidates = tuple(f"{d}/{name}" for d in KMOD_DIRS)
    return next((c for c in candidates if os.access(c, os.X_OK)), candidates[0])


def _tool(candidates: tuple[str, ...], name: str) -> str:
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    raise EffectError(f"no {name} binary found (looked at {', '.join(candidates)})")


def _replace_file(path: Path, text: str | None) -> None:
    """PATH holds TEXT afterwards, replaced in one rename (a reader sees the old file or the new
    one), or is gone for None."""
    if text is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class KernelLog:
    """The kernel's log from now on (/dev/kmsg, read from its end): what a module's init said."""

    def __init__(self, root: Root) -> None:
        try:
            self.fd: int | None = os.open(root("/dev/kmsg"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    def since(self, most: int = 8) -> list[str]:
        """The messages logged since (the last MOST), without their "prio,seq,time,flags;" prefix."""
        said: list[str] = []
        while self.fd is not None:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: go on with the next
                    continue
                break
            if not record:
                break
            text = record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0].strip()
            if text:
                said.append(text)
        return said[-most:]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SystemEffects:
    """The live system. ROOT prefixes the paths of device nodes, uevents and GC roots."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self._libc: ctypes.CDLL | None = None

    # -- kernel modules ------------------------------------------------------------------------
    def _syscall(self, op: str, target: str, name: str, *args: object) -> None:
        machine = os.uname().machine  # what platform.machine() returns, without importing platform
        numbers = SYSCALLS.get(machine)
        if numbers is None:
            raise EffectError(f"unsupported architecture {machine}")
        if self._libc is None:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._libc.syscall.restype = ctypes.c_long
        if self._libc.syscall(ctypes.c_long(numbers[name]), *args) != 0:
            raise KmodError(op, target, ctypes.get_errno())

    def load(self, path: str, params: str) -> None:
        """Loads PATH; a failure carries what the kernel logged meanwhile (the driver's own words,
        e.g. "NVRM: No NVIDIA GPU found."), not only errno's."""
        log = KernelLog(self.root)
        try:
            self._load(path, params)
        except KmodError as e:
            said = log.since()
            # The driver's own diagnostics when it gave any ("NVRM: No NVIDIA GPU found."), not the
            # taint notices and banners every load of it logs.
            said = [line for line in said if line.startswith("NVRM")] or said
            if not said:
                raise
            explained = EXPLAIN.get(e.errno) or os.strerror(e.errno)
            raise KmodError(e.op, e.target, e.errno, f"{explained}; the kernel logged: {' | '.join(said)}") from e
        finally:
            log.close()

    def _load(self, path: str, params: str) -> None:
        opts = ctypes.c_char_p(params.encode(errors="surrogateescape"))
        if path.endswith(COMPRESSED):
            image = read_bytes(Path(path))
            # The bytes object's own buffer, not a copy (a real nvidia.ko is 74 MB): init_module
            # only reads it.
            self._syscall("load", path, "init_module", ctypes.c_char_p(image), ctypes.c_ulong(len(image)), opts)
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._syscall("load", path, "finit_module", ctypes.c_int(fd), opts, ctypes.c_int(0))
        finally:
            os.close(fd)

    def unload(self, name: str) -> None:
        # O_NONBLOCK: fail at once if the module is in use, never wait for its users to go away.
        self._syscall("unload", name, "delete_module", ctypes.c_char_p(name.encode()), ctypes.c_uint(os.O_NONBLOCK))

    def load_by_name(self, name: str) -> None:
        """A module of the running kernel (e.g. drm) that the new driver needs: modprobe finds it."""
        modprobe = kmod_tool("modprobe")
        try:
            proc = subprocess.run([modprobe, "--", name], capture_output=True, text=True, errors="surrogateescape")
        except OSError as e:
            raise KmodError("modprobe", name, 0, f"{modprobe}: {e.strerror}") from e
        if proc.returncode != 0:
            raise KmodError("modprobe", name, 0, proc.stderr.strip() or f"exit {proc.returncode}")

    # -- device nodes ----------------------------------------------------------------------------
    def remove_node(self, path: str) -> None:
        Path(self.root(path)).unlink(missing_ok=True)

    def replay_add(self, module: str) -> None:
        """Asks the kernel to send the module's "add" uevent again (what `udevadm trigger` does)."""
        try:
            self.root(f"/sys/module/{module}/uevent").write_text("add")
        except OSError:
            pass

    def replace_node(self, path: str, major: int, minor: int) -> None:
        """PATH becomes a character device MAJOR:MINOR with the old node's mode and owner, in one
        rename (what nvidia-modprobe's mknod_helper does with a node of the wrong number, minus the
        moment without a node)."""
        target = self.root(path)
        old = os.lstat(target)
        tmp = target.with_name(f".{target.name}.nvidia-kmod-swap")
        tmp.unlink(missing_ok=True)
        os.mknod(tmp, stat.S_IFCHR | stat.S_IMODE(old.st_mode), os.makedev(major, minor))
        try:
            os.chown(tmp, old.st_uid, old.st_gid)
            os.chmod(tmp, stat.S_IMODE(old.st_mode))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- module autoload -------------------------------------------------------------------------
    def block_autoload(self, modules: list[str]) -> None:
        """Until unblock_autoload: modprobe of MODULES (by name or by alias, e.g. the kernel's
        char-major-195-255 when something opens /dev/nvidiactl) runs `false` instead of loading the
        booted driver. Our own loads are by file (finit_module) and do not go through modprobe."""
        path = self.root(AUTOLOAD_BLOCK)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# nvidia-kmod-swap: a driver swap is in progress; removed when it ends (a stale copy is",
                 "# removed by the next run of nvidia-kmod-swap). See `nvidia-kmod-swap status`."]
        lines += [f"install {name} false" for name in modules]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)

    def unblock_autoload(self) -> None:
        self.root(AUTOLOAD_BLOCK).unlink(missing_ok=True)

    def route_by_name(self, text: str | None) -> None:
        """BY_NAME_RULES holds TEXT afterwards (replaced in one rename), or is gone for None."""
        _replace_file(self.root(BY_NAME_RULES), text)

    # -- firmware ----------------------------------------------------------------------------------
    def set_firmware_path(self, path: str) -> None:
        """Where the kernel's firmware loader looks first (what NixOS activation writes)."""
        self.root(FIRMWARE_PATH).write_text(path)

    # -- units and commands ----------------------------------------------------------------------
    def systemctl(self, args: list[str]) -> None:
        systemctl = _tool(("/run/current-system/sw/bin/systemctl", "/usr/bin/systemctl", "/bin/systemctl"), "systemctl")
        proc = subprocess.run([systemctl, *args], capture_output=True, text=True, errors="surrogateescape")
        if proc.returncode != 0:
            raise EffectError(f"systemctl {' '.join(args)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")

    def run_command(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr); EffectError when it cannot run or times out."""
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="surrogateescape", timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EffectError(f"{argv[0]} could not run: {e}") from e
        return proc.returncode, proc.stdout, proc.stderr

    # -- Nix GC roots ----------------------------------------------------------------------------
    def set_gc_roots(self, directory: str, targets: dict[str, str]) -> None:
        """DIRECTORY holds exactly TARGETS (link name -> store path) afterwards. Nix treats a
        symlink below /nix/var/nix/gcroots that points into the store as a root (nix's
        libstore/gc.cc findRoots), so the files a loaded driver came from survive a GC."""
        top = self.root(directory)
        top.mkdir(parents=True, exist_ok=True)
        for name, target in targets.items():
            link = top / name
            tmp = top / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, link)
        for entry in top.iterdir():
            if entry.name not in targets:
                entry.unlink(missing_ok=True)

    # -- the driver links (userspace.py) -----------------------------------------------------------
    def set_pin_rules(self, text: str | None) -> None:
        """PIN_RULES holds TEXT afterwards (replaced in one rename), or is gone for None."""
        _replace_file(self.root(PIN_RULES), text)

    def apply_tmpfiles(self, paths: list[str]) -> None:
        """systemd-tmpfiles --create for PATHS only: whichever rule wins for each (the pin's, or the
        generation's graphics-driver.conf once the pin is gone) is applied by systemd itself."""
        tool = _tool(("/run/current-system/sw/bin/systemd-tmpfiles", "/usr/bin/systemd-tmpfiles",
                      "/bin/systemd-tmpfiles"), "systemd-tmpfiles")
        argv = [tool, "--create", *(f"--prefix={p}" for p in paths)]
        if not self.root.is_live:
            argv.insert(1, f"--root={self.root.base}")
        proc = subprocess.run(argv, capture_output=True, text=True, errors="surrogateescape")
        # Exit 65 (EX_DATAERR) for a syntax warning elsewhere in tmpfiles.d is not ours: the caller
        # reads the links back and reports what they show.
        if proc.returncode not in (0, 65):
            raise EffectError(f"systemd-tmpfiles: {proc.stderr.strip() or f'exit {proc.returncode}'}")

    def set_link(self, path: str, target: str | None) -> None:
        """PATH is a symlink to TARGET afterwards (one rename), or gone for None."""
        link = self.root(path)
        if target is None:
            if link.is_symlink():
                link.unlink()
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
