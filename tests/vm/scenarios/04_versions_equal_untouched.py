"""Versions equal: a restart touches nothing (no module reloaded, load addresses unchanged)."""

BOOT = {"driver": "old"}


def test(machine, bed):
    machine.wait_for_unit("nvidia-persistenced.service")
    before = machine.module_addresses()
    loads = machine.dmesg().count("NVRM: loading NVIDIA UNIX")
    assert bed.restart_persistenced() == 0
    machine.wait_for_unit("nvidia-persistenced.service")
    after = machine.module_addresses()
    assert {k: v for k, v in after.items() if k.startswith("nvidia")} == {k: v for k, v in before.items() if k.startswith("nvidia")}
    assert machine.dmesg().count("NVRM: loading NVIDIA UNIX") == loads == 1
    rc, _ = bed.helper("check")
    assert rc == 0
