"""The profile's driver is for another kernel: deferred (reboot required), not failed, nothing unloaded."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    before = machine.module_addresses()
    bed.switch_driver("new", config={"kernel_release": "6.1.0-99-amd64"})
    bed.restart_persistenced()
    machine.wait_until_succeeds("test \"$(systemctl show -P ActiveState nvidia-persistenced)\" = inactive", 60)
    assert machine.module_addresses() == before
    assert machine.driver_versions()["nvidia"] == old
    assert "a reboot is required" in machine.journal("-u nvidia-persistenced")
    # With on_kernel_change=fail the unit fails instead, still touching nothing.
    bed.switch_driver("new", config={"kernel_release": "6.1.0-99-amd64", "on_kernel_change": "fail"})
    bed.restart_persistenced()
    bed.wait_persistenced_failed()
    assert machine.module_addresses() == before
