"""The helper is SIGKILLed at each step of a swap; the next start recovers to a consistent driver
(all old or all new, never a mix). Steps: 4 unloads, 4 loads, verification. A swap that had
changed the kernel when it was killed is rolled back and recorded as failed, so that a restart
does not take the GPU away again (issue 22); `swap --retry` then swaps."""

BOOT = {"driver": "old", "persistenced": False}
MODULES = ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")


def test(machine, bed):
    machine.wait_for_unit("multi-user.target")
    target = "new"
    for step in range(9):
        bed.switch_driver(target)
        rc, out = bed.helper("swap", env=f"NVIDIA_KMOD_SWAP_KILL_AT_STEP={step}")
        assert rc in (137, -9, 128 + 9), f"step {step}: helper was not killed ({rc}): {out}"
        machine.succeed("test -e /run/nvidia-kmod-swap/swap.json")
        rc, _ = bed.helper("check")
        assert rc == 0, f"step {step}: check must let the recovery run"
        rc, out = bed.helper("swap")
        assert rc in (0, 1), f"step {step}: recovery run failed ({rc}): {out}"
        found = machine.driver_versions()
        assert len(set(found.values())) == 1, f"step {step}: mixed driver {found}"
        if rc == 1:  # rolled back and not retried: recorded with where it was interrupted
            assert "interrupted at" in machine.succeed("cat /run/nvidia-kmod-swap/failed.json"), step
            assert bed.helper("check")[0] == 255, f"step {step}: check must not start a recorded failure"
            rc, out = bed.helper("swap --retry")
            assert rc == 0, f"step {step}: swap --retry failed ({rc}): {out}"
            found = machine.driver_versions()
        assert set(found) == set(MODULES), f"step {step}: {found}"
        assert len(set(found.values())) == 1, f"step {step}: mixed driver {found}"
        assert found["nvidia"] == bed.packages[target]["version"], f"step {step}: {found}"
        machine.succeed("test ! -e /run/nvidia-kmod-swap/swap.json")
        machine.succeed("test \"$(stat -c %t:%T /dev/nvidiactl)\" = c3:ff")
        target = "old" if target == "new" else "new"
