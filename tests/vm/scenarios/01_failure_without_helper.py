"""The blog post's failure, reproduced: the old driver is loaded, the system profile switches to the
new one, and nvidia-persistenced (without the helper) fails on the version mismatch."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("multi-user.target")
    bed.switch_driver("new", helper=False)
    assert bed.restart_persistenced() != 0, "persistenced started against a mismatched module"
    machine.wait_until_succeeds("test \"$(systemctl show -P ActiveState nvidia-persistenced)\" = failed", 60)
    kernel_log = machine.dmesg()
    assert f"NVRM: API mismatch: the client has the version {new}, but" in kernel_log, kernel_log[-2000:]
    assert f"NVRM: this kernel module has the version {old}." in kernel_log
    assert "Failed to query NVIDIA devices" in machine.journal("-t nvidia-persistenced")
    assert machine.module_version("nvidia") == old
    # nvidia-smi of the new package sees the same mismatch.
    out = machine.fail(f"{bed.packages['new']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert "Driver/library version mismatch" in out, out
