"""Issue 11 §1: a driver bump restarts every NVIDIA unit in the same switch (a CDI generator, a
power limit), queued together with nvidia-persistenced as switch-to-configuration's start phase
queues them. Wired by the module (after the swap, the same `check`), all succeed after a swap; with
the GPU busy they are skipped, not failed, and the deploy succeeds."""

BOOT = {"driver": "old", "gpu_units": True}
UNITS = ["gpu-cdi-generator.service", "gpu-power-limit.service"]


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    for unit in UNITS:
        machine.wait_for_unit(unit)
        assert machine.succeed(f"cat /run/{unit.removesuffix('.service')}.out").strip() == old
    bed.switch_driver("new")
    # One systemctl call, three jobs in the queue at once: systemd orders them by After=.
    rc, out = machine.execute("systemctl restart nvidia-persistenced.service " + " ".join(UNITS), timeout=180)
    assert rc == 0, out + machine.journal("-n 80")
    for unit in ["nvidia-persistenced.service", *UNITS]:
        assert machine.unit_property(unit, "ActiveState") == "active", unit
        assert machine.unit_property(unit, "Result") == "success", unit
    for unit in UNITS:
        assert machine.succeed(f"cat /run/{unit.removesuffix('.service')}.out").strip() == new, unit
        assert machine.succeed(f"wc -l < /run/{unit.removesuffix('.service')}.runs").strip() == "2", unit
    assert machine.module_version("nvidia") == new
    assert "API mismatch" not in machine.dmesg()

    # The GPU busy: the next bump is deferred; every unit is skipped by its condition, none failed.
    bed.hold_gpu()
    bed.switch_driver("new-b")
    rc, out = machine.execute("systemctl restart nvidia-persistenced.service " + " ".join(UNITS), timeout=180)
    assert rc == 0, out
    for unit in ["nvidia-persistenced.service", *UNITS]:
        assert machine.unit_property(unit, "ActiveState") == "inactive", unit
        assert machine.unit_property(unit, "Result") == "exec-condition", unit
    assert machine.module_version("nvidia") == new
    assert "API mismatch" not in machine.dmesg()
