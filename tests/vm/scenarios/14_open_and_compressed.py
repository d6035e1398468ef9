"""The open-module layout (kernel/drivers/video/) and .ko.xz / .ko.zst modules swap too, and a
profile rolled back to the old driver swaps back (deploy-rs's auto-rollback)."""

BOOT = {"driver": "old"}


def test(machine, bed):
    machine.wait_for_unit("nvidia-persistenced.service")
    for label in ("new-xz", "old", "new-zst", "old", "new-open"):
        bed.switch_driver(label)
        assert bed.restart_persistenced() == 0, f"{label}: " + machine.journal("-u nvidia-persistenced")[-1500:]
        machine.wait_for_unit("nvidia-persistenced.service")
        want = bed.packages[label]["version"]
        assert set(machine.driver_versions().values()) == {want}, (label, machine.driver_versions())
    assert machine.dmesg().count("NVRM: loading NVIDIA UNIX") == 6
