"""Two runs at once: one waits for the other's lock; the result is exactly one swap."""

BOOT = {"driver": "old", "persistenced": False}


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("multi-user.target")
    bed.switch_driver("new")
    cmd = "nvidia-kmod-swap --log-target stderr --config /etc/nvidia-kmod-swap/config.json swap"
    out = machine.succeed(f"({cmd} > /tmp/a 2>&1; echo $? > /tmp/a.rc) & ({cmd} > /tmp/b 2>&1; echo $? > /tmp/b.rc) & wait; cat /tmp/a.rc /tmp/b.rc")
    assert out.split() == ["0", "0"], out + machine.succeed("cat /tmp/a /tmp/b")
    assert machine.dmesg().count(f"NVRM: loading NVIDIA UNIX x86_64 Kernel Module  {new}") == 1
    assert set(machine.driver_versions().values()) == {new}
