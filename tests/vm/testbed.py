"""The real-kernel test bed: a Debian kernel under QEMU (TCG), a debootstrapped Debian userland with
systemd and udev as its initramfs, the fake NVIDIA driver, and the helper.

Host side only, standard library only. Scenarios use `Machine` (shaped like the NixOS test
driver's `machine`) and `Bed` (the driver packages and how to switch between them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest"
CACHE = Path(os.environ.get("NKS_CACHE", REPO / ".cache"))

# The guest's Debian release: bookworm (systemd 252) by default; trixie (systemd 257, the age NixOS
# 2026 runs) with `tests/vm/run --userland trixie`.
SUITES = ("bookworm", "trixie")
# dbus: slurmd (22.05 and 24.11) puts job steps in a scope of their own through systemd, over D-Bus.
SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "dbus"]
SLURM_UNITS = ["munge.service", "slurmctld.service", "slurmd.service"]
GUEST_PACKAGES = [
    "systemd", "systemd-sysv", "udev", "kmod", "procps", "psmisc",
    "python3", "python3-pyudev", "python3-systemd", "python3-packaging", "python3-zstandard",
    # python3-zstandard needs a cffi backend through virtual packages debootstrap cannot resolve.
    "python3-cffi-backend",
    # The seed script of the blog post, run by the benchmark for comparison, uses rg.
    "ripgrep",
    # Slurm, the cluster's scheduler (issue 25): enabled only where a scenario asks (Boot.slurm).
    *SLURM_PACKAGES,
]
# What the guest does not need and would only make every boot slower to unpack.
TRIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "var/cache/apt", "var/lib/apt/lists", "usr/share/zoneinfo"]
# Units a minimal Debian enables that do nothing useful in a throwaway guest.
MASK = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
        "fstrim.timer", "systemd-timesyncd.service", "getty@tty1.service"]
DEFAULT_MODULES = ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
# In-tree modules of the host's kernel the guest's module tree carries (paths as in modules.dep).
IN_TREE_MODULES = ["kernel/drivers/gpu/drm/drm.ko",
                   # the Slurm guests' cluster network (Boot.slurm: a dummy interface)
                   "kernel/drivers/net/dummy.ko",
                   # what Debian's real nvidia-drm and nvidia-modeset depend on (tests/real-driver)
                   "kernel/drivers/gpu/drm/drm_kms_helper.ko", "kernel/drivers/acpi/video.ko"]
# GPU units of a crowded host (issue 11): unit -> what it stands for. The NixOS module wires the real
# ones (nvidia-container-toolkit-cdi-generator, nvidia-powerd, nvidia-fabricmanager, the user's).
GPU_UNITS = {"gpu-cdi-generator.service": "CDI generator (nvidia-ctk cdi generate: NVML)",
             "gpu-power-limit.service": "power limit (nvidia-smi -pl)"}
CDI_UNIT = "nvidia-container-toolkit-cdi-generator.service"


# A cluster of one controller and one GPU node (this guest), and three GPU nodes that run no slurmd
# here: other nodes of the fleet, whose drains slurmctld reports (max_unavailable). Slurm 22.05
# (bookworm) and 24.11 (trixie) read it alike. No cgroup plugins: the guest has no dbus for the
# scope slurmd's cgroup/v2 plugin makes, so a job's processes stay in slurmd.service's cgroup.
SLURM_CONF = """\
ClusterName=testbed
SlurmctldHost=testbed
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=600
NodeName=testbed CPUs=1 RealMemory=200 Gres=gpu:1 State=UNKNOWN
NodeName=gpu[2-4] CPUs=1 RealMemory=200 Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes=testbed,gpu[2-4] Default=YES MaxTime=INFINITE State=UP
"""


def log(msg: str) -> None:
    print(f"testbed: {msg}", flush=True)


def kernel_abi() -> str:
    return subprocess.run([str(REPO / "tests/lib/kernel-abi")], check=True, capture_output=True,
                          text=True).stdout.strip()


def debian_mirror() -> str:
    """The first URIs: line of the machine's apt sources; never written into a file of ours."""
    for line in Path("/etc/apt/sources.list.d/debian.sources").read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    raise RuntimeError("no URIs: line in /etc/apt/sources.list.d/debian.sources")


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pack(root: Path, out: Path) -> None:
    """An uncompressed newc cpio of ROOT: the kernel unpacks it into the initramfs as is."""
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f:
        find = subprocess.Popen(["find", ".", "-print0"], cwd=root, stdout=subprocess.PIPE)
        subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, stdin=find.stdout,
                       stdout=f, check=True)
        if find.wait() != 0:
            raise RuntimeError(f"find failed in {root}")
    tmp.replace(out)


# nixpkgs' pyudev (pkgs/development/python-modules/pyudev/default.nix, 0.24.4) loads libudev by
# its store path: postPatch replaces this call in src/pyudev/_ctypeslib/utils.py, on Linux. Debian's
# keeps it, and CPython's ctypes.util.find_library runs `/sbin/ldconfig -p` on every call: a
# process per swap that the NixOS helper does not start. The guest's pyudev is patched the same way.
PYUDEV_FIND_LIBRARY = "find_library(name)"


def _pyudev_as_nixpkgs(root: Path) -> None:
    utils = root / "usr/lib/python3/dist-packages/pyudev/_ctypeslib/utils.py"
    libudev = next((root / "usr/lib").glob("*-linux-gnu/libudev.so.1"))
    text = utils.read_text()
    if PYUDEV_FIND_LIBRARY not in text:  # as substituteInPlace --replace-fail
        raise SystemExit(f"testbed: {PYUDEV_FIND_LIBRARY} is not in {utils}: Debian's pyudev changed")
    utils.write_text(text.replace(PYUDEV_FIND_LIBRARY, repr("/" + str(libudev.relative_to(root)))))
    # Its bytecode again, by the guest's own Python (py3compile did it at install).
    subprocess.run(["chroot", str(root), "python3", "-m", "py_compile", "/" + str(utils.relative_to(root))], check=True)


def base_image(suite: str = "bookworm") -> Path:
    """The guest's Debian root (SUITE) as a cpio, built once per set of inputs and cached."""
    key = _digest(suite, GUEST_PACKAGES, TRIM, MASK, PYUDEV_FIND_LIBRARY, "v1")
    out = CACHE / "vm" / f"base-{key}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="root-", dir=out.parent))
    # mkdtemp makes it 0700: as the guest's /, no user but root could reach anything (munge's
    # postinst runs mungekey as the munge user, and fails there).
    root.chmod(0o755)
    try:
        log(f"debootstrap {suite} (about a minute, cached afterwards)")
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(GUEST_PACKAGES),
                        suite, str(root), debian_mirror()], check=True, stdout=subprocess.DEVNULL)
        for path in TRIM:
            shutil.rmtree(root / path, ignore_errors=True)
        for unit in MASK:
            target = root / "etc/systemd/system" / unit
            target.unlink(missing_ok=True)
            target.symlink_to("/dev/null")
        for unit in SLURM_UNITS:  # their packages enable them; a scenario with Boot.slurm does
            (root / "etc/systemd/system/multi-user.target.wants" / unit).unlink(missing_ok=True)
        _pyudev_as_nixpkgs(root)
        # What the guest runs, for the run's header line (tests/vm/run): systemd, Slurm.
        status = (root / "var/lib/dpkg/status").read_text()
        versions = {}
        for block in status.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
            if fields.get("Package") in ("systemd", "slurmd", "kmod"):
                versions[fields["Package"]] = fields.get("Version", "")
        out.with_suffix(".json").write_text(json.dumps(versions))
        (root / "init").symlink_to("/sbin/init")
        (root / "etc/hostname").write_text("testbed\n")
        (root / "etc/machine-id").write_text("")
        _pack(root, out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log(f"guest base image: {out} ({out.stat().st_size >> 20} MiB)")
    return out


CHROOT = CACHE / "kbuild" / "trixie"  # tests/fake-driver/kernels: newer kernels' headers and toolchain


def newer_kernels() -> list[str]:
    """The newer kernels the trixie chroot carries headers of (tests/fake-driver/kernels' stamp)."""
    stamp = CHROOT / ".nks-kernels"
    return stamp.read_text().split() if stamp.exists() else []


@dataclass
class Kernel:
    """A kernel the guest boots: its release, image, module tree and the fake driver built for it."""

    release: str
    image: Path
    modules: Path          # its /lib/modules/<release>, with modules.dep
    packages_dir: Path     # the fake driver's packages (driver_packages)


def host_kernel() -> Kernel:
    abi = kernel_abi()
    return Kernel(abi, Path(f"/boot/vmlinuz-{abi}"), Path("/lib/modules") / abi, driver_packages(abi))


def chroot_kernel(release: str) -> Kernel:
    """RELEASE of the trixie chroot (6.12, 7.x): Debian's image package unpacked (not installed)
    into .cache/kernels/<release>, depmod'ed; the fake driver's modules built by the chroot's
    toolchain, its userspace here (the guest's userland is bookworm's)."""
    kit = CACHE / "kernels" / release
    done = kit / ".complete"
    if not done.exists():
        log(f"fetching linux-image-{release} (the package, unpacked; nothing installed)")
        tmp = CHROOT / "tmp" / "nks-image"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # 6.12's image package holds the kernel and its modules; 7.x splits them into
        # linux-binary-<release> and linux-modules-<release>, which its image package depends on.
        for package in (f"linux-image-{release}", f"linux-binary-{release}", f"linux-modules-{release}",
                        f"linux-base-{release}"):
            subprocess.run(["chroot", str(CHROOT), "sh", "-c", f"cd /tmp/nks-image && apt-get download -qq {package}"],
                           check=package.startswith("linux-image"), stderr=subprocess.DEVNULL)
        shutil.rmtree(kit, ignore_errors=True)
        kit.mkdir(parents=True)
        for deb in sorted(tmp.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(kit)], check=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if (kit / "usr/lib/modules").is_dir() and not (kit / "lib").exists():
            (kit / "lib").symlink_to("usr/lib")  # trixie is merged-usr; depmod -b reads lib/modules
        subprocess.run(["depmod", "-b", str(kit), release], check=True)
        done.write_text(release + "\n")
    # /boot/vmlinuz-<release> (6.12), or beside its modules (7.x's kernel-install layout).
    image = next(p for p in (kit / "boot" / f"vmlinuz-{release}", kit / "lib/modules" / release / "vmlinuz") if p.exists())
    out = CACHE / "fake-driver" / release
    subprocess.run([str(REPO / "tests/fake-driver/build"), "--chroot", str(CHROOT), "--kdir",
                    f"/usr/src/linux-headers-{release}", "--out", str(out)], check=True)
    return Kernel(release, image, kit / "lib/modules" / release, out)


def driver_packages(abi: str) -> Path:
    """Builds (or reuses) the fake driver packages for the guest kernel; returns the output dir."""
    out = CACHE / "fake-driver" / abi
    subprocess.run([str(REPO / "tests/fake-driver/build"), "--kdir", f"/usr/src/linux-headers-{abi}",
                    "--out", str(out)], check=True)
    return out


@dataclass
class Boot:
    """How a guest boots; scenarios set these as a dict named BOOT."""

    driver: str | None = "old"          # package whose modules the booted system loads (None: no driver loaded)
    profile: str | None = None          # package "in the system profile" at boot (default: driver, or "new")
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_MODULES))  # loaded at boot
    extra_packages: list[str] = field(default_factory=list)  # more packages in the booted module tree
    gpus: int = 1
    cmdline: str = ""
    files: dict[str, str] = field(default_factory=dict)
    persistenced: bool = True           # nvidia-persistenced enabled (started at boot)
    gpu_units: bool = False             # the GPU units of GPU_UNITS, enabled and wired
    retry_timer: bool = False           # nvidia-kmod-swap-retry.timer enabled (NixOS always has it)
    cdi: bool = False                   # nvidia-container-toolkit's CDI generator, wired as a GPU unit
    slurm: bool = False                 # slurmctld + slurmd (this node, "testbed", Gres=gpu:1) and munge
    real: tuple[str, ...] = ()          # Debian's real NVIDIA modules to carry (tests/real-driver: "real-550", ...)
    memory_mib: int = 2048


class Overlay:
    """The per-boot part of the initramfs: helper, driver packages, guest config, scenario files."""

    def __init__(self, boot: Boot, abi: str, packages_dir: Path, modules: Path | None = None) -> None:
        self.boot, self.abi, self.packages_dir = boot, abi, packages_dir
        self.modules = modules or Path("/lib/modules") / abi  # the kernel's own module tree
        self.index = json.loads((packages_dir / "packages.json").read_text())

    def build(self, out: Path) -> None:
        root = Path(tempfile.mkdtemp(prefix="overlay-", dir=out.parent))
        root.chmod(0o755)  # its "." is the guest's / when the kernel unpacks it (base_image)
        try:
            self._populate(root)
            _pack(root, out)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _put(self, root: Path, path: str, text: str, mode: int = 0o644) -> None:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def _enable(self, root: Path, unit: str, target: str, kind: str = "wants",
                target_dir: str = "/etc/systemd/system") -> None:
        wants = root / f"etc/systemd/system/{target}.{kind}"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).symlink_to(f"{target_dir}/{unit}")

    def _populate(self, root: Path) -> None:
        boot = self.boot
        # The helper, as its source tree: no build step, the guest's Python runs it directly.
        helper_src = REPO / "helper/src/nvidia_kmod_swap"
        if helper_src.is_dir():
            shutil.copytree(helper_src, root / "usr/lib/python3/dist-packages/nvidia_kmod_swap",
                            ignore=shutil.ignore_patterns("__pycache__"))
        self._put(root, "/usr/bin/nvidia-kmod-swap",
                  "#!/usr/bin/python3\nimport sys\nfrom nvidia_kmod_swap.cli import main\nsys.exit(main())\n", 0o755)
        # The driver packages, under /nix/store as on NixOS.
        shutil.copytree(self.packages_dir / "nix", root / "nix", symlinks=True)
        index = self.index
        if boot.real:
            # Debian's real modules (tests/real-driver/build), as switch-driver packages: no
            # userspace or firmware of theirs (the machine has no NVIDIA GPU; their init fails).
            real_dir = CACHE / "real-driver" / self.abi
            subprocess.run([str(REPO / "tests/real-driver/build")], check=True)
            real = json.loads((real_dir / "packages.json").read_text())["packages"]
            index = {**self.index, "packages": dict(self.index["packages"])}
            for label in boot.real:
                package = real[label]
                shutil.copytree(real_dir / package["path"].lstrip("/"), root / package["path"].lstrip("/"))
                index["packages"][label] = {**package, "firmware_dir": f"{package['path']}/lib/firmware",
                                            "lib_dir": f"{package['path']}/lib"}
        self._put(root, "/etc/testbed/packages.json", json.dumps(index, indent=2))
        # Guest plumbing.
        self._put(root, "/usr/local/lib/testbed/backdoor.py", (GUEST / "backdoor.py").read_text(), 0o755)
        self._put(root, "/etc/systemd/system/backdoor.service", (GUEST / "backdoor.service").read_text())
        self._enable(root, "backdoor.service", "sysinit.target")
        self._put(root, "/usr/local/bin/switch-driver", (GUEST / "switch-driver").read_text(), 0o755)
        self._put(root, "/usr/local/bin/nix-collect-garbage", (GUEST / "nix-collect-garbage").read_text(), 0o755)
        self._put(root, "/etc/udev/rules.d/60-nvidia.rules", (GUEST / "60-nvidia.rules").read_text())
        self._put(root, "/etc/systemd/system/nvidia-persistenced.service",
                  (GUEST / "nvidia-persistenced.service").read_text())
        if boot.persistenced:
            self._enable(root, "nvidia-persistenced.service", "multi-user.target")
        for unit in ("nvidia-kmod-swap-retry.service", "nvidia-kmod-swap-retry.timer"):
            self._put(root, f"/etc/systemd/system/{unit}", (GUEST / unit).read_text())
        if boot.retry_timer:
            self._enable(root, "nvidia-kmod-swap-retry.timer", "timers.target")
        gpu_units = []
        if boot.gpu_units:
            template = (GUEST / "gpu-unit.service.in").read_text()
            for unit, what in GPU_UNITS.items():
                text = template.replace("@WHAT@", what).replace("@NAME@", unit.removesuffix(".service"))
                self._put(root, f"/etc/systemd/system/{unit}", text)
                self._enable(root, unit, "multi-user.target")
            gpu_units += sorted(GPU_UNITS)
        if boot.cdi:
            self._put(root, f"/etc/systemd/system/{CDI_UNIT}", (GUEST / CDI_UNIT).read_text())
            self._enable(root, CDI_UNIT, "multi-user.target")
            for tool in ("nvidia-ctk-cdi-generate", "cdi-run"):
                self._put(root, f"/usr/local/bin/{tool}", (GUEST / tool).read_text(), 0o755)
            self._put(root, "/etc/udev/rules.d/99-nvidia-container-toolkit.rules",
                      (GUEST / "99-nvidia-container-toolkit.rules").read_text())
            gpu_units.append(CDI_UNIT)
        if gpu_units:
            self._put(root, "/etc/testbed/gpu-units.json", json.dumps(gpu_units))
        if boot.slurm:
            # A cluster network: Slurm resolves names with AI_ADDRCONFIG, which glibc answers only
            # when a non-loopback address exists, and the guest has no NIC. A dummy interface
            # (systemd-networkd makes it; the kernel loads dummy.ko) holds this node's address;
            # the other nodes' names resolve to addresses where nothing answers.
            self._put(root, "/etc/systemd/network/10-cluster.netdev", "[NetDev]\nName=cluster0\nKind=dummy\n")
            self._put(root, "/etc/systemd/network/10-cluster.network",
                      "[Match]\nName=cluster0\n\n[Network]\nAddress=10.0.0.1/24\n")
            self._enable(root, "systemd-networkd.service", "multi-user.target", target_dir="/lib/systemd/system")
            self._put(root, "/etc/hosts", "127.0.0.1 localhost\n10.0.0.1 testbed\n"
                      + "".join(f"10.0.0.{i} gpu{i}\n" for i in range(2, 5)))
            self._put(root, "/etc/slurm/slurm.conf", SLURM_CONF)
            self._put(root, "/etc/slurm/gres.conf", "NodeName=testbed Name=gpu File=/dev/nvidia0\n")
            # slurmd as a NixOS GPU node runs it with AutoDetect=nvml: NVML initialised once and
            # kept for slurmd's life (Slurm 25.05 src/plugins/gpu/nvml/gpu_nvml.c, _nvml_init; no
            # shutdown until fini), so /dev/nvidiactl stays open in slurmd.service. Debian's slurmd
            # has no NVML plugin: a process of the unit holds it instead, and goes with slurmd.
            self._put(root, "/etc/systemd/system/slurmd.service.d/nvml.conf", (
                "[Service]\n"
                "ExecStartPost=/bin/sh -c 'setsid /bin/bash -c \"exec 3<>/dev/nvidiactl; exec -a slurmd-nvml sleep infinity\""
                " >/dev/null 2>&1 &'\n"
                "ExecStopPost=-/usr/bin/pkill -f ^slurmd-nvml\n"))
            for unit in SLURM_UNITS:
                self._enable(root, unit, "multi-user.target", target_dir="/lib/systemd/system")
        # What a switch runs before any other unit (switch-to-configuration-ng: the restart of
        # sysinit-reactivation.target), and graphics.nix's link for GPU programs (gpu-client).
        for unit in ("sysinit-reactivation.target", "systemd-tmpfiles-resetup.service", "nvidia-kmod-swap-pin.service"):
            self._put(root, f"/etc/systemd/system/{unit}", (GUEST / unit).read_text())
        for unit in ("systemd-tmpfiles-resetup.service", "nvidia-kmod-swap-pin.service"):
            self._enable(root, unit, "sysinit-reactivation.target", kind="requires")
        shutil.copy(self.packages_dir / self.index["gpu_client"], root / "usr/local/bin/gpu-client")
        profile = boot.profile or boot.driver or "new"
        self._put(root, "/etc/systemd/system/testbed-profile.service", (
            "[Unit]\nDescription=Test bed: the system profile's driver\nDefaultDependencies=no\n"
            "After=local-fs.target\nBefore=sysinit.target nvidia-persistenced.service systemd-tmpfiles-setup.service\n\n"
            f"[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart=/usr/local/bin/switch-driver --no-reload --booted {boot.driver or profile} {profile}\n"))
        self._enable(root, "testbed-profile.service", "sysinit.target")
        self._booted_module_tree(root)
        for path, text in boot.files.items():
            self._put(root, path, text)

    def _booted_module_tree(self, root: Path) -> None:
        """/lib/modules/<abi> as NixOS's booted system has it: the driver's modules linked into the
        tree that modprobe (and systemd-modules-load at boot) reads; the helper's rollback dir."""
        # Debian's root is merged-usr: /lib is a symlink to usr/lib, and an overlay entry "lib" that
        # is a directory would replace that symlink when the kernel unpacks the archives.
        tree = root / "usr/lib/modules" / self.abi
        extra = tree / "extra"
        extra.mkdir(parents=True)
        host_tree = self.modules
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (host_tree / name).exists():
                shutil.copy(host_tree / name, tree / name)
        # In-tree modules the fake driver links against (nvidia-drm.ko uses drm.ko, as the real one
        # does), with their dependencies from the host's modules.dep: copied from the installed
        # kernel image package, as a NixOS system's tree has them.
        deps = {}
        for line in (host_tree / "modules.dep").read_text().splitlines():
            target, _, rest = line.partition(":")
            deps[target] = rest.split()
        # A newer kernel's tree has them compressed (Debian's 6.12: drm.ko.xz): the same names.
        named = {rel.split(".ko")[0]: rel for rel in deps}
        wanted, todo = set(), [named[m.removesuffix(".ko")] for m in IN_TREE_MODULES if m.removesuffix(".ko") in named]
        while todo:
            rel = todo.pop()
            if rel not in wanted:
                wanted.add(rel)
                todo += deps.get(rel, [])
        for rel in sorted(wanted):
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(host_tree / rel, tree / rel)
        labels = ([self.boot.driver] if self.boot.driver else []) + self.boot.extra_packages
        for label in labels:
            module_dir = Path(self.index["packages"][label]["module_dir"])
            for ko in sorted((root / module_dir.relative_to("/")).rglob("*.ko*")):
                link = extra / ko.name
                link.unlink(missing_ok=True)
                link.symlink_to(os.path.relpath(ko, extra))
        (root / "lib").symlink_to("usr/lib")  # for depmod -b only
        try:
            subprocess.run(["depmod", "-b", str(root), self.abi], check=True)
        finally:
            (root / "lib").unlink()
        if self.boot.driver and self.boot.modules:
            self._put(root, "/etc/modules-load.d/nvidia.conf", "\n".join(self.boot.modules) + "\n")


class GuestError(AssertionError):
    pass


class Machine:
    """One QEMU guest. API shaped like the NixOS test driver's `machine`."""

    def __init__(self, name: str, boot: Boot, workdir: Path) -> None:
        self.name, self.boot, self.workdir = name, boot, workdir
        self.console_log = workdir / "console.log"
        self.process: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, initrd: Path, image: Path, timeout: float = 180) -> None:
        sock_path = self.workdir / "backdoor.sock"
        append = " ".join(filter(None, [
            "console=ttyS0 panic=-1 loglevel=4 systemd.show_status=0 mitigations=off",
            f"nvidia.gpus={self.boot.gpus}" if self.boot.gpus != 1 else "",
            self.boot.cmdline,
        ]))
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1",
               "-m", str(self.boot.memory_mib), "-nodefaults", "-display", "none", "-no-reboot",
               "-kernel", str(image), "-initrd", str(initrd), "-append", append,
               "-chardev", f"file,id=console,path={self.console_log}", "-serial", "chardev:console",
               "-chardev", f"socket,id=backdoor,path={sock_path},server=on,wait=off",
               "-serial", "chardev:backdoor"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not sock_path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise GuestError("QEMU did not create its backdoor socket")
            time.sleep(0.05)
        # QEMU binds the socket before it listens: a connect in between is refused (seen once in a
        # CI-like run with the machine loaded), so retry until it listens.
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(sock_path))
                break
            except ConnectionRefusedError:
                self.sock.close()
                self._check_alive()
                if time.monotonic() > deadline:
                    raise GuestError("QEMU's backdoor socket refused connections") from None
                time.sleep(0.05)
        # The guest's agent starts early in boot; until it does, our lines fall on a closed port.
        while True:
            try:
                self._request("true", timeout=10, wait=1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise GuestError(f"guest agent did not answer within {timeout}s; console: {self.console_log}") from None

    def shutdown(self) -> None:
        if self.sock:
            self.sock.close()
            self.sock = None
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _check_alive(self) -> None:
        if self.process and self.process.poll() is not None:
            out = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
            raise GuestError(f"QEMU exited with {self.process.returncode}: {out.strip()}; console: {self.console_log}")

    # -- the command channel -------------------------------------------------------------------
    def _request(self, cmd: str, timeout: float, wait: float | None = None) -> tuple[int, str]:
        assert self.sock is not None, "machine not started"
        request_id = self._next_id
        self._next_id += 1
        self.sock.sendall((json.dumps({"id": request_id, "cmd": cmd, "timeout": timeout}) + "\n").encode())
        deadline = time.monotonic() + (wait if wait is not None else timeout + 15)
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                # Before the agent puts the port in raw mode the tty echoes our own lines back.
                if reply.get("id") == request_id and "rc" in reply:
                    return reply["rc"], reply["out"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer to {cmd!r}")
            self._check_alive()
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                self._check_alive()
                raise GuestError("backdoor closed")
            self._buffer += chunk

    def execute(self, cmd: str, timeout: float = 120) -> tuple[int, str]:
        return self._request(cmd, timeout)

    def succeed(self, cmd: str, timeout: float = 120) -> str:
        rc, out = self.execute(cmd, timeout)
        if rc != 0:
            raise GuestError(f"command failed (exit {rc}): {cmd}\n{out}")
        return out

    def fail(self, cmd: str, timeout: float = 120) -> str:
        rc, out = self.execute(cmd, timeout)
        if rc == 0:
            raise GuestError(f"command unexpectedly succeeded: {cmd}\n{out}")
        return out

    def _wait_until(self, cmd: str, timeout: float, succeed: bool) -> str:
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(cmd, timeout=max(5.0, timeout))
            if (rc == 0) == succeed:
                return out
            if time.monotonic() > deadline:
                want = "success" if succeed else "failure"
                raise GuestError(f"timed out after {timeout}s waiting for {want} of: {cmd}\nlast output:\n{out}")
            time.sleep(0.5)

    def wait_until_succeeds(self, cmd: str, timeout: float = 60) -> str:
        return self._wait_until(cmd, timeout, succeed=True)

    def wait_until_fails(self, cmd: str, timeout: float = 60) -> str:
        return self._wait_until(cmd, timeout, succeed=False)

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Waits until UNIT is active; fails at once if it failed (as the NixOS driver does)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.execute(f"systemctl show -P ActiveState {shlex.quote(unit)}")[1].strip()
            if state == "active":
                return
            if state == "failed":
                raise GuestError(f"unit {unit} failed:\n" + self.execute(f"systemctl status --no-pager -n 30 {shlex.quote(unit)}")[1])
            if time.monotonic() > deadline:
                raise GuestError(f"unit {unit} not active after {timeout}s (state {state})")
            time.sleep(0.5)

    # -- conveniences for assertions on what the system really did ---------------------------
    def unit_property(self, unit: str, prop: str) -> str:
        return self.succeed(f"systemctl show -P {prop} {shlex.quote(unit)}").strip()

    def journal(self, args: str = "") -> str:
        return self.succeed(f"journalctl --no-pager -o cat {args}")

    def dmesg(self) -> str:
        return self.succeed("dmesg")

    def module_version(self, module: str = "nvidia") -> str | None:
        rc, out = self.execute(f"cat /sys/module/{module}/version")
        return out.strip() if rc == 0 else None

    def driver_versions(self) -> dict[str, str | None]:
        """Version of each loaded NVIDIA module, from sysfs."""
        out = self.succeed("for m in /sys/module/nvidia*; do echo \"${m##*/} $(cat $m/version 2>/dev/null)\"; done")
        return dict((line.split() + [None])[:2] for line in out.splitlines() if line.strip() and "*" not in line)

    def module_addresses(self) -> dict[str, str]:
        """Load address of each module: it changes when a module is unloaded and loaded again."""
        return {f[0]: f[5] for f in (line.split() for line in self.succeed("cat /proc/modules").splitlines())}

    def assert_driver_nodes(self) -> None:
        """/dev/nvidiactl, /dev/nvidia0 and /dev/nvidia-uvm exist with the device numbers the loaded
        driver registered (195:255, 195:0, and nvidia-uvm's dynamic major from /proc/devices)."""
        self.succeed("test \"$(stat -c %t:%T /dev/nvidiactl)\" = c3:ff")
        self.succeed("test \"$(stat -c %t:%T /dev/nvidia0)\" = c3:0")
        uvm_major = int(self.succeed("awk '$2 == \"nvidia-uvm\" {print $1}' /proc/devices"))
        self.succeed(f"test \"$(stat -c %t /dev/nvidia-uvm)\" = {uvm_major:x}")

    def loaded_modules(self) -> dict[str, str]:
        """name -> the modules using it, from /proc/modules (the kernel's own view)."""
        mods = {}
        for line in self.succeed("cat /proc/modules").splitlines():
            fields = line.split()
            mods[fields[0]] = fields[3]
        return mods


@dataclass
class Bed:
    """What a scenario knows of the driver packages, and how to switch the system profile."""

    machine: Machine
    packages: dict[str, dict]
    boot: Boot

    def switch_driver(self, label: str, *, extra: tuple[str, ...] = (), config: dict | None = None,
                      helper: bool = True) -> None:
        args = [label] + [f"--extra={e}" for e in extra]
        args += [f"--set={k}={json.dumps(v)}" for k, v in (config or {}).items()]
        args.append("--helper" if helper else "--no-helper")
        self.machine.succeed("switch-driver " + " ".join(shlex.quote(a) for a in args))

    def switch(self, label: str, *, config: dict | None = None) -> tuple[int, str]:
        """`nixos-rebuild switch` to a generation whose driver is LABEL, in switch-to-configuration-ng's
        order (pkgs/by-name/sw/switch-to-configuration-ng/src/src/main.rs): stop the units that
        changed (the swap unit and the GPU units, whose restartTriggers name the driver; resetup and
        the pin unit, whose trigger is /etc/tmpfiles.d, which the new graphics-drivers environment
        changes), run the activation (switch-driver: /etc, /run/current-system, the firmware path),
        reload systemd, restart sysinit-reactivation.target and wait for it, then start the stopped
        units. Returns the exit code and output of that start (switch-to-configuration exits 4 on a
        failed start)."""
        gpu_units = json.loads(self.machine.succeed("cat /etc/testbed/gpu-units.json 2>/dev/null || echo '[]'"))
        units = ["nvidia-persistenced.service", *gpu_units]
        self.machine.succeed("systemctl stop " + " ".join(
            units + ["systemd-tmpfiles-resetup.service", "nvidia-kmod-swap-pin.service"]), timeout=180)
        self.switch_driver(label, config=config)
        self.machine.succeed("systemctl restart sysinit-reactivation.target", timeout=180)
        return self.machine.execute("systemctl start " + " ".join(units), timeout=300)

    def gpu_program(self, command: str = "gpu-client") -> tuple[int, str]:
        """A GPU program started now (nixpkgs' addDriverRunpath: RUNPATH /run/opengl-driver/lib):
        (exit code, output); "driver V library V" when its libraries match the loaded module."""
        return self.machine.execute(command)

    def hold_gpu(self, unit: str = "cuda-job.service", path: str = "/dev/nvidia0") -> str:
        """A transient unit that keeps PATH open, as a CUDA job does; its pid once it holds it."""
        self.machine.succeed(f"systemd-run --unit={unit} /bin/bash -c 'exec 3<>{path}; exec sleep infinity'")
        return self.wait_holding(unit, path)

    def wait_holding(self, unit: str, path: str) -> str:
        """Waits until UNIT's main process has PATH open (the kernel's /proc/<pid>/fd); its pid."""
        self.machine.wait_until_succeeds(f"ls -l /proc/$(systemctl show -P MainPID {unit})/fd | grep -q {path}")
        return self.machine.unit_property(unit, "MainPID")

    def unit_state(self, unit: str = "nvidia-persistenced.service") -> str:
        return self.machine.unit_property(unit, "ActiveState")

    def helper(self, args: str, env: str = "") -> tuple[int, str]:
        return self.machine.execute(f"{env} nvidia-kmod-swap --log-target stderr --config /etc/nvidia-kmod-swap/config.json {args}")

    def restart_persistenced(self) -> int:
        """Restarts the unit as switch-to-configuration does; returns systemctl's exit code."""
        out = self.machine.succeed("journalctl -u nvidia-persistenced -n 0 --show-cursor --no-pager")
        self._restart_cursor = out.strip().rpartition("cursor: ")[2]
        return self.machine.execute("systemctl restart nvidia-persistenced.service", timeout=180)[0]

    def wait_persistenced_failed(self, timeout: float = 60) -> None:
        """Waits until a start of the unit since the last restart_persistenced() has failed.

        Restart=always starts a failed unit again; systemd parks it in `failed` only once
        StartLimitBurst (5 starts in 10 s) is hit. Under TCG a failing start of the helper takes
        about 2 s, so the limit may never be hit and ActiveState cycles through `activating`
        (seen on these machines). systemd logs each failed start either way, so this waits for that
        line in the unit's journal after the restart.
        """
        cursor = getattr(self, "_restart_cursor", "")
        self.machine.wait_until_succeeds(
            f"journalctl -u nvidia-persistenced --no-pager --after-cursor='{cursor}'"
            " --grep 'Failed with result' >/dev/null", timeout)


class Testbed:
    """Builds the images once per run and boots machines from them."""

    def __init__(self, kernel: str = "", userland: str = "bookworm") -> None:
        """KERNEL: "" for the bed's own kernel (tests/lib/kernel-abi), or a release (or its prefix,
        e.g. "6.12") of the trixie chroot's newer kernels. USERLAND: the guest's Debian release."""
        if userland not in SUITES:
            raise SystemExit(f"testbed: no userland {userland!r} (have: {', '.join(SUITES)})")
        self.userland = userland
        if kernel:
            matches = [r for r in newer_kernels() if r.startswith(kernel)]
            if not matches:
                raise SystemExit(f"testbed: no kernel {kernel!r} in {CHROOT} (have: {', '.join(newer_kernels()) or 'none'};"
                                 " tests/fake-driver/kernels makes the chroot)")
            self.kernel = chroot_kernel(matches[-1])
        else:
            self.kernel = host_kernel()
        self.abi = self.kernel.release
        self.base = base_image(userland)
        try:
            self.userland_versions = json.loads(self.base.with_suffix(".json").read_text())
        except FileNotFoundError:
            self.userland_versions = {}
        self.packages_dir = self.kernel.packages_dir
        self.index = json.loads((self.packages_dir / "packages.json").read_text())
        self.runs = CACHE / "vm" / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)

    def boot(self, name: str, boot: Boot) -> tuple[Machine, Bed]:
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.runs))
        overlay = workdir / "overlay.cpio"
        Overlay(boot, self.abi, self.packages_dir, self.kernel.modules).build(overlay)
        initrd = workdir / "initrd.cpio"
        with initrd.open("wb") as out:
            for part in (self.base, overlay):
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        overlay.unlink()
        machine = Machine(name, boot, workdir)
        try:
            machine.start(initrd, self.kernel.image)
        except BaseException:
            machine.shutdown()  # a guest that never answered must not outlive the run
            raise
        finally:
            initrd.unlink(missing_ok=True)  # the guest has it in memory now
        packages = dict(self.index["packages"])
        if boot.real:
            real = json.loads((CACHE / "real-driver" / self.abi / "packages.json").read_text())["packages"]
            packages.update({label: real[label] for label in boot.real})
        return machine, Bed(machine, packages, boot)
