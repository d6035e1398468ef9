"""Issue 11 §4: a client opens /dev/nvidiactl every 20 ms throughout the swap. nvidia.ko declares
MODULE_ALIAS_CHARDEV_MAJOR(195) and the booted (old) driver is in the tree modprobe reads, so every
open while no driver is loaded makes the kernel modprobe it. The swap must end all-new, with no old
`nvidia` loaded by the kernel in between, and leave modprobe able to load the driver again."""

BOOT = {"driver": "old"}

OPENER = r"""
import errno, os, time
fails = {}
while True:
    try:
        os.close(os.open("/dev/nvidiactl", os.O_RDWR))
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        fails[name] = fails.get(name, 0) + 1
        with open("/run/opener.fails", "w") as f:
            f.write(" ".join(f"{k}={v}" for k, v in sorted(fails.items())) + "\n")
    time.sleep(0.02)
"""


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    # The bed is as hostile as a real host: the alias resolves to the booted driver.
    assert machine.succeed("modprobe --resolve-alias char-major-195-255").split() == ["nvidia"]
    machine.succeed("cat > /run/opener.py <<'EOF'\n" + OPENER + "\nEOF")
    # The kernel's module autoloader runs /proc/sys/kernel/modprobe: a wrapper that notes each call
    # and execs the real modprobe (which reads the helper's block, if any) shows what it tried.
    machine.succeed("printf '#!/bin/sh\\necho \"$*\" >> /run/kernel-modprobe.log\\nexec /sbin/modprobe \"$@\"\\n' "
                    "> /run/modprobe-logger && chmod +x /run/modprobe-logger "
                    "&& echo /run/modprobe-logger > /proc/sys/kernel/modprobe")
    # Real-time priority: on the guest's one vCPU it preempts the helper every 20 ms, so it opens
    # during the gap however short.
    machine.succeed("systemd-run --unit=nvml-opener.service -p CPUSchedulingPolicy=fifo -p CPUSchedulingPriority=50 "
                    "/usr/bin/python3 /run/opener.py")
    machine.wait_for_unit("nvml-opener.service")
    loading = "dmesg | grep -c 'NVRM: loading NVIDIA UNIX x86_64 Kernel Module  {}' || true"
    assert machine.succeed(loading.format(old)).strip() == "1"  # at boot
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    versions = machine.driver_versions()
    assert all(versions[m] == new for m in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")), versions
    # The kernel's log: the old driver was never loaded again; the new one was loaded once.
    kernel_log = machine.dmesg()
    assert machine.succeed(loading.format(old)).strip() == "1", kernel_log[-3000:]
    assert machine.succeed(loading.format(new)).strip() == "1", kernel_log[-3000:]
    # The client did open in the gap: the kernel asked modprobe for the char major's alias, and the
    # old driver did not come back (an open then blocks in request_module, and either fails or,
    # when the new driver is loaded meanwhile, succeeds against it) ...
    calls = machine.succeed("cat /run/kernel-modprobe.log")
    assert "char-major-195-" in calls, calls
    # ... and it is still running; the block is gone: modprobe's `install nvidia` now loads the new
    # driver's file (issue 21: loads by name after a swap), never `false`.
    assert machine.unit_property("nvml-opener.service", "ActiveState") == "active"
    machine.succeed("test ! -e /run/modprobe.d/nvidia-kmod-swap.conf")
    install = machine.succeed("modprobe --showconfig | grep '^install nvidia '")
    assert "false" not in install and bed.packages["new"]["path"] in install, install
