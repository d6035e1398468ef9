with subtest("a busy GPU defers: nothing unloaded, the unit skipped, not failed"):
    rc, out = switch_while_busy("new")
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    assert unit_state("nvidia-persistenced") == "inactive"
    machine.succeed("journalctl -u nvidia-persistenced --grep 'cuda-job.service'")

with subtest("once the GPU is idle, a restart of the unit swaps"):
    machine.succeed("systemctl stop cuda-job.service")
    machine.succeed("systemctl restart nvidia-persistenced.service")
    assert set(versions().values()) == {NEW}, versions()
