"""Issue 12 (pyudev): the swap waits for udev's processed add events of the modules it loads, not
for udev's whole queue. Another device's rule runs a program for 30 s (a slow RUN+=, as a disk or
network rule may have) and is still being processed while the unit swaps: the swap finishes within
settle_timeout_s (10 s) with the nodes made, while udev is still busy with the other device.
Waiting for udev's queue to drain (/run/udev/queue, what `udevadm settle` waits for) would wait
past settle_timeout_s and fail, and so would the rollback, which waits the same way (seen: the
unit's swap exited 4 with the Monitor disabled)."""

# Keeps one udev worker busy for 30 s on a "change" event of /dev/zero (a device every guest has);
# the files it touches say, from udev's side, when the program started and whether it has ended.
RULE = ('ACTION=="change", SUBSYSTEM=="mem", KERNEL=="zero", '
        'RUN+="/bin/sh -c \'touch /run/slow-rule-started; sleep 30; touch /run/slow-rule-ended\'"\n')

BOOT = {"driver": "old", "files": {"/etc/udev/rules.d/99-slow-other-device.rules": RULE}}


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.switch_driver("new")
    machine.succeed("udevadm trigger --action=change /sys/devices/virtual/mem/zero")
    machine.wait_until_succeeds("test -e /run/slow-rule-started", 30)
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    # udev is still processing the other device's event: its queue file is there (udevd removes it
    # once no event is queued or running) and the rule's program has not ended.
    machine.succeed("test -e /run/udev/queue")
    machine.succeed("test ! -e /run/slow-rule-ended")
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.unit_property("nvidia-persistenced.service", "Result") == "success"
    for module in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"):
        assert machine.module_version(module) == new, (module, machine.module_version(module))
    # The nodes udev's rules made for the new driver are there, with its device numbers.
    machine.assert_driver_nodes()
    journal = machine.journal("-u nvidia-persistenced")
    assert f"NVIDIA driver {new} loaded (upgrade from {old})" in journal, journal
    assert "rolled back" not in journal and "not ready" not in journal, journal
    steps = machine.succeed("journalctl SYSLOG_IDENTIFIER=nvidia-kmod-swap PRIORITY=7 --no-pager -o cat")
    assert "device nodes: udev reported its add events of" in steps, steps
