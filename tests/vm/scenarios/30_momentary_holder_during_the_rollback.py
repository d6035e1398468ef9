"""Issue 22: a failing swap rolls back while a monitoring agent has the new /dev/nvidiactl open for
a moment: an exporter that polls every 10 ms and, once the new driver is loaded, opens the device
for 2 s (real-time priority, so that it opens before the rollback starts on the guest's one vCPU).
The rollback waits it out as the forward path waits (busy_grace_s) and ends with the old driver
loaded. (On 0c4fa7d: "rollback failed: nvidia cannot be unloaded", exit 4, the new nvidia left.)"""

BOOT = {"driver": "old", "persistenced": False}
MODULES = ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")
EXPORTER = r"""
import os, sys, time
new = sys.argv[1]
while True:
    try:
        with open("/sys/module/nvidia/version") as f:
            loaded = f.read().strip()
    except OSError:
        loaded = None
    if loaded == new:
        fd = os.open("/dev/nvidiactl", os.O_RDWR)
        open("/run/exporter-held", "w").close()
        time.sleep(2)
        os.close(fd)
        break
    time.sleep(0.01)
"""


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["uvm-fails"]["version"]
    machine.wait_for_unit("multi-user.target")
    machine.succeed("cat > /run/exporter.py <<'EOF'\n" + EXPORTER + "\nEOF")
    machine.succeed("systemd-run --unit=exporter.service -p CPUSchedulingPolicy=fifo -p CPUSchedulingPriority=50 "
                    f"/usr/bin/python3 /run/exporter.py {new}")
    bed.switch_driver("uvm-fails")
    rc, out = bed.helper("swap")
    machine.succeed("test -e /run/exporter-held")  # it did hold the new driver's device
    assert rc == 3, f"expected a rollback (3), got {rc}: {out}"
    found = machine.driver_versions()
    assert found == {m: old for m in MODULES}, found
    machine.succeed("test ! -e /run/nvidia-kmod-swap/swap.json")
