"""The blog post's failure, reproduced: the old driver is loaded, the system profile switches to the
new one, and nvidia-persistenced (without the helper) fails on the version mismatch, with the
kernel's and nvidia-smi's texts of today's drivers."""
import re

BOOT = {"driver": "old"}


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("multi-user.target")
    bed.switch_driver("new", helper=False)
    assert bed.restart_persistenced() != 0, "persistenced started against a mismatched module"
    machine.wait_until_succeeds("test \"$(systemctl show -P ActiveState nvidia-persistenced)\" = failed", 60)
    kernel_log = machine.dmesg()
    # The text of drivers since 575.51.02 (osapi.c RmPerformVersionCheck): the client by name and pid.
    # (dmesg indents a message's continuation lines)
    assert re.search(r"NVRM: API mismatch: the client 'nvidia-persiste' \(pid \d+\)\n\s*"
                     rf"NVRM: has the version {re.escape(new)}, but this kernel module has\n\s*"
                     rf"NVRM: the version {re.escape(old)}\.  Please make sure that this\n", kernel_log), kernel_log[-2000:]
    assert "Failed to query NVIDIA devices" in machine.journal("-t nvidia-persistenced")
    assert machine.module_version("nvidia") == old
    # nvidia-smi of the new package sees the same mismatch.
    rc, out = machine.execute(f"{bed.packages['new']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    major_minor = ".".join(new.split(".")[:2])
    assert rc == 18 and out.splitlines() == ["Failed to initialize NVML: Driver/library version mismatch",
                                             f"NVML library version: {major_minor}"], (rc, out)
