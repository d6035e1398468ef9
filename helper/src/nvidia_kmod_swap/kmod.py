"""The only code that changes the kernel: load a module file by absolute path, unload by name.

Real syscalls (finit_module, init_module, delete_module) through libc's syscall(2), no shell and
no modprobe search path: the exact file the plan names is the one the kernel gets. Compressed
modules are decompressed here, as kmod does, because not every kernel decompresses in-kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import subprocess
from pathlib import Path
from typing import Protocol

from .modinfo import read_bytes

SYSCALLS = {
    "x86_64": {"init_module": 175, "delete_module": 176, "finit_module": 313},
    "aarch64": {"init_module": 105, "delete_module": 106, "finit_module": 273},
}

EXPLAIN = {
    errno.EEXIST: "a module of that name is already loaded",
    errno.EBUSY: "the module is in use",
    errno.EAGAIN: "the module is in use (held by another module or an open device)",
    errno.ENOEXEC: "invalid module format (built for another kernel?)",
    errno.ENOENT: "unknown symbol or module not loaded",
    errno.EKEYREJECTED: "the module signature was rejected",
    errno.EPERM: "not permitted (lockdown, or module loading disabled)",
    errno.EINVAL: "invalid parameters or module",
    errno.ENODEV: "the module's init found no device",
}


class KmodError(Exception):
    def __init__(self, op: str, target: str, err: int, detail: str = "") -> None:
        self.op, self.target, self.errno = op, target, err
        text = detail or EXPLAIN.get(err) or os.strerror(err)
        super().__init__(f"{op} {target}: {os.strerror(err)} ({text})" if err else f"{op} {target}: {text}")


class Kernel(Protocol):
    def load(self, path: str, params: str) -> None: ...
    def unload(self, name: str) -> None: ...
    def load_by_name(self, name: str) -> None: ...


class SyscallKernel:
    """The live kernel."""

    def __init__(self) -> None:
        numbers = SYSCALLS.get(platform.machine())
        if numbers is None:
            raise RuntimeError(f"unsupported architecture {platform.machine()}")
        self.nr = numbers
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def _call(self, op: str, target: str, *args) -> None:
        if self.libc.syscall(*args) != 0:
            raise KmodError(op, target, ctypes.get_errno())

    def load(self, path: str, params: str) -> None:
        opts = ctypes.c_char_p(params.encode())
        if path.endswith((".xz", ".zst")):
            image = read_bytes(Path(path))
            buf = ctypes.create_string_buffer(image, len(image))
            self._call("load", path, ctypes.c_long(self.nr["init_module"]), buf, ctypes.c_ulong(len(image)), opts)
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._call("load", path, ctypes.c_long(self.nr["finit_module"]), ctypes.c_int(fd), opts, ctypes.c_int(0))
        finally:
            os.close(fd)

    def unload(self, name: str) -> None:
        # O_NONBLOCK: fail at once if the module is in use, never wait for its users to go away.
        self._call("unload", name, ctypes.c_long(self.nr["delete_module"]), ctypes.c_char_p(name.encode()),
                   ctypes.c_uint(os.O_NONBLOCK))

    def load_by_name(self, name: str) -> None:
        """A module of the running kernel (e.g. drm) that the new driver needs: modprobe finds it."""
        for candidate in ("/run/current-system/sw/bin/modprobe", "/usr/sbin/modprobe", "/sbin/modprobe"):
            if os.access(candidate, os.X_OK):
                proc = subprocess.run([candidate, "--", name], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise KmodError("modprobe", name, 0, proc.stderr.strip() or f"exit {proc.returncode}")
                return
        raise KmodError("modprobe", name, 0, "no modprobe binary found")
