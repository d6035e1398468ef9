"""Issue 21, item 5: after a live swap, a module loaded *by name* is the new driver's, with the
user's parameters. The bed's kmod searches the booted driver first (/lib/modules/<abi>/extra, as
NixOS's kmod searches /run/booted-system/kernel-modules first), so nvidia_drm loaded later by a
display manager, nvidia_uvm loaded again by CUDA's nvidia-modprobe and nvidia_peermem loaded by an
admin would be the booted files against the new nvidia (on 0c4fa7d: nvidia_drm 580.95.05)."""

MODULES = ["nvidia", "nvidia_modeset", "nvidia_uvm"]  # boot.kernelModules: no nvidia_drm, as on a server
BOOT = {"driver": "old", "modules": MODULES,
        "files": {"/etc/modprobe.d/nvidia-drm.conf": "options nvidia_drm modeset=1\n"}}


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.module_version("nvidia_drm") is None
    bed.switch_driver("new", config={"modules": MODULES})
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    assert machine.driver_versions() == {"nvidia": new, "nvidia_modeset": new, "nvidia_uvm": new}, machine.driver_versions()
    # Loads by name, each through kmod's modprobe as the real callers run it.
    machine.succeed("modprobe nvidia_drm")  # a display manager
    machine.succeed("rmmod nvidia_uvm && modprobe nvidia_uvm")  # nvidia-modprobe -u for CUDA
    machine.succeed("modprobe nvidia_peermem")  # an admin, for GPUDirect RDMA
    for module in ("nvidia_drm", "nvidia_uvm", "nvidia_peermem"):
        assert machine.module_version(module) == new, (module, machine.module_version(module))
    # The user's parameter from modprobe.d reached the load (kmod's $CMDLINE_OPTS).
    assert machine.succeed("cat /sys/module/nvidia_drm/parameters/modeset").strip() == "Y"
    # The kernel's holder graph is the new driver's, and udev made nvidia-uvm's node on its major.
    users = machine.loaded_modules()["nvidia"]
    assert {"nvidia_modeset", "nvidia_uvm", "nvidia_peermem"} <= set(users.strip(",").split(",")), users
    machine.wait_until_succeeds("test -c /dev/nvidia-uvm")
    major = machine.succeed("awk '$2 == \"nvidia-uvm\" { print $1 }' /proc/devices").strip()
    assert machine.succeed("stat -c %t /dev/nvidia-uvm").strip() == format(int(major), "x")
    assert "API mismatch" not in machine.dmesg()
    # `modprobe --dry-run --verbose` shows what kmod would run: the new driver's file.
    shown = machine.succeed("modprobe -r nvidia_peermem && modprobe --dry-run --verbose nvidia_peermem")
    assert bed.packages["new"]["path"] in shown and bed.packages["old"]["path"] not in shown, shown
    # Back on the booted driver (a switch back to the old generation), by-name loads need no routing.
    bed.switch_driver("old", config={"modules": MODULES})
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")[-2000:]
    assert machine.module_version("nvidia") == old
    machine.fail("test -e /run/modprobe.d/nvidia-kmod-swap.driver.conf")
    machine.succeed("rmmod nvidia_uvm && modprobe nvidia_uvm")
    assert machine.module_version("nvidia_uvm") == old
