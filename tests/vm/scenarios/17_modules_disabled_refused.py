"""security.lockKernelModules (kernel.modules_disabled = 1): the kernel refuses every unload and
load until reboot. The helper refuses before planning, with that reason, and touches nothing."""

BOOT = {"driver": "old"}


def test(machine, bed):
    machine.wait_for_unit("nvidia-persistenced.service")
    before = machine.module_addresses()
    machine.succeed("echo 1 > /proc/sys/kernel/modules_disabled")
    bed.switch_driver("new")
    assert bed.restart_persistenced() != 0
    bed.wait_persistenced_failed()
    assert machine.module_addresses() == before
    journal = machine.journal("-u nvidia-persistenced")
    assert "modules_disabled = 1" in journal and "security.lockKernelModules" in journal, journal[-2000:]
    # what the kernel says, not what we say: an unload really is refused
    machine.fail("rmmod nvidia_drm")
