"""A process opens the *new* /dev/nvidia0 in the middle of a swap that then fails: the kernel
refuses to unload nvidia (EAGAIN, every time). The rollback must not tear the driver down to a
bare nvidia: it unloads nothing, exits 4 naming what sysfs shows, and each restart does the same
until the holder is gone; then the next start converges back to the old driver."""

NEW = "580.105.08"
BOOT = {"driver": "old", "files": {"/etc/systemd/system/grabber.service": (
    "[Service]\nExecStart=/bin/bash -c 'while :; do "
    f"if [ \"$(cat /sys/module/nvidia/version 2>/dev/null)\" = {NEW} ]; then exec 3</dev/nvidia0; exec sleep infinity; fi; "
    "sleep 0.02; done'\n")}}
DRIVER = ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")


def test(machine, bed):
    old = bed.packages["old"]["version"]
    assert bed.packages["new"]["version"] == NEW
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.succeed("systemctl start grabber.service")
    # The verify step fails after the new modules are loaded and the grabber holds /dev/nvidia0.
    bed.switch_driver("new", config={"verify_command": ["/bin/sh", "-c", "sleep 2; echo 0.0.0"]})
    assert bed.restart_persistenced() != 0
    bed.wait_persistenced_failed()
    pid = machine.unit_property("grabber.service", "MainPID")
    machine.succeed(f"ls -l /proc/{pid}/fd | grep -q /dev/nvidia0")
    assert machine.driver_versions() == {m: NEW for m in DRIVER}, machine.driver_versions()  # nothing torn down
    journal = machine.journal("-u nvidia-persistenced")
    assert "nvidia cannot be unloaded" in journal and "rolled back: the NVIDIA driver" not in journal, journal[-3000:]
    assert f"Loaded now (sysfs): nvidia {NEW}" in journal
    machine.succeed("test -e /run/nvidia-kmod-swap/swap.json")
    # Restart=always retries: still blocked, still nothing unloaded.
    machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    assert bed.restart_persistenced() != 0
    bed.wait_persistenced_failed()
    assert machine.driver_versions() == {m: NEW for m in DRIVER}, machine.driver_versions()
    # The holder goes: the next start converges on the old driver (and does not retry the failed swap).
    machine.succeed("systemctl stop grabber.service")
    machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    bed.restart_persistenced()
    machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {old}", 60)
    machine.wait_until_succeeds("test ! -e /run/nvidia-kmod-swap/swap.json", 60)
    assert machine.driver_versions() == {m: old for m in DRIVER}, machine.driver_versions()
    assert "rolled back: the NVIDIA driver 580.95.05 is loaded again" in machine.journal("-u nvidia-persistenced")
    machine.succeed("test \"$(stat -c %t:%T /dev/nvidia0)\" = c3:0")
