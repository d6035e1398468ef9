"""A process holds /dev/nvidia0 under on_busy=defer: nothing is unloaded, the unit is skipped (not
failed) and the journal names the pid and its unit."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    pid = bed.hold_gpu()
    before = machine.module_addresses()
    bed.switch_driver("new")
    bed.restart_persistenced()
    machine.wait_until_succeeds("test \"$(systemctl show -P ActiveState nvidia-persistenced)\" = inactive", 60)
    assert bed.unit_state() != "failed"
    assert machine.unit_property("nvidia-persistenced.service", "Result") in ("exec-condition", "success")
    assert machine.driver_versions()["nvidia"] == old
    assert machine.module_addresses() == before, "a module was reloaded"
    journal = machine.journal("-u nvidia-persistenced")
    assert f"pid {pid} (sleep) holds /dev/nvidia0 [cuda-job.service]" in journal, journal[-1500:]
    assert machine.unit_property("cuda-job.service", "ActiveState") == "active"
    # `status` reads the pending deferral back from the journal (systemd.journal.Reader).
    status = machine.succeed("nvidia-kmod-swap status")
    assert "pending: upgrade to 580.105.08" in status and "deferred since:" in status, status
    assert f"pid {pid} (sleep) holds /dev/nvidia0" in status, status
