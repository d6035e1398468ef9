with subtest("a bump: the GPU unit, restarted by the same switch, runs after the swap"):
    machine.wait_for_unit("gpu-power-limit.service")
    assert machine.succeed("cat /run/gpu-power-limit.out").strip() == OLD
    rc, out = switch("new")
    assert rc == 0, out
    assert set(versions().values()) == {NEW}, versions()
    assert unit_state("gpu-power-limit") == "active"
    assert machine.succeed("cat /run/gpu-power-limit.out").strip() == NEW
    machine.fail("journalctl -k --grep 'API mismatch'")

with subtest("deferred: the GPU unit is skipped, not failed"):
    rc, out = switch("base")  # back to the old driver (the deploy-rs roll-back path swaps too)
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    rc, out = switch_while_busy("new")
    assert rc == 0, out
    assert set(versions().values()) == {OLD}, versions()
    for unit in ("nvidia-persistenced", "gpu-power-limit"):
        assert unit_state(unit) == "inactive", unit
        assert machine.succeed(f"systemctl show -P Result {unit}").strip() == "exec-condition", unit
    status = machine.succeed("nvidia-kmod-swap status")
    assert "deferred since:" in status and "cuda-job.service" in status, status

with subtest("the job ends: the retry timer finishes the swap and runs the GPU unit again"):
    machine.succeed("systemctl stop cuda-job.service")
    machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {NEW}", timeout=90)
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.wait_for_unit("gpu-power-limit.service")
    assert set(versions().values()) == {NEW}, versions()
    assert machine.succeed("cat /run/gpu-power-limit.out").strip() == NEW
    machine.succeed("journalctl -u nvidia-kmod-swap-retry --grep 'the GPU is idle'")
