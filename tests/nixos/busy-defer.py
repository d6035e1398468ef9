with subtest("a busy GPU defers: nothing unloaded, the unit skipped, not failed"):
    machine.succeed("systemctl start cuda-job.service")
    machine.wait_until_succeeds(
        "ls -l /proc/$(systemctl show -P MainPID cuda-job.service)/fd | grep /dev/nvidia0 >/dev/null"
    )
    rc, out = switch("new")
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    assert unit_state("nvidia-persistenced") == "inactive"
    machine.succeed("journalctl -u nvidia-persistenced --grep 'cuda-job.service'")

with subtest("once the GPU is idle, a restart of the unit swaps"):
    machine.succeed("systemctl stop cuda-job.service")
    machine.succeed("systemctl restart nvidia-persistenced.service")
    assert set(versions().values()) == {NEW}, versions()
