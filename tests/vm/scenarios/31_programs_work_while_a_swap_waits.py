"""Issue 23: the machine keeps working while a swap waits. A CUDA job holds the GPU, the switch to
a new driver defers the swap; graphics.nix's /run/opengl-driver rule, re-applied by the switch's
systemd-tmpfiles-resetup, would point every program started from then on at the new driver's
libraries ("Failed to initialize NVML: Driver/library version mismatch"). The pin keeps them on the
loaded driver, through the switch and through a later `systemd-tmpfiles --create`; once the job
ends the timer swaps and the links follow the new driver."""

BOOT = {"driver": "old", "retry_timer": True}
PIN = "/run/tmpfiles.d/00-nvidia-kmod-swap-pin.conf"


def test(machine, bed):
    old, new = bed.packages["old"]["version"], bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {old} library {old}", out
    booted_env = machine.succeed("readlink /run/opengl-driver").strip()

    bed.hold_gpu()
    rc, out = bed.switch("new")
    assert rc == 0, out
    assert machine.module_version("nvidia") == old and bed.unit_state() == "inactive"
    # The generation's rule names the new environment; the link still shows the loaded driver's.
    rule = machine.succeed("cat /etc/tmpfiles.d/graphics-driver.conf")
    new_env = machine.succeed("readlink /run/current-system/graphics-drivers").strip()
    assert new_env in rule and new_env != booted_env, rule
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {old} library {old}", f"a program started after the switch: {rc} {out}"
    assert "API mismatch" not in machine.dmesg()
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    # The link systemd-tmpfiles made, from the pin rule, not one the helper wrote behind its back.
    machine.succeed(f"grep -q '^L+ /run/opengl-driver - - - - {booted_env}$' {PIN}")
    # A later `systemd-tmpfiles --create` (by hand, or any package's activation) keeps the pin.
    machine.succeed("systemd-tmpfiles --create --prefix=/run/opengl-driver")
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {old} library {old}", out
    # status and the journal say what is pinned, to which version and why; the stable link names
    # the nvidia-smi that matches the loaded module.
    status = machine.succeed("nvidia-kmod-swap status")
    assert f"driver links:    pinned to the loaded driver {old}: /run/opengl-driver -> {booted_env}" in status, status
    smi = f"{bed.packages['old']['path']}/bin/nvidia-smi"
    assert f"nvidia-smi:      {smi}" in status, status
    assert machine.succeed("readlink -f /run/nvidia-loaded-driver/bin/nvidia-smi").strip() == smi
    assert machine.succeed("/run/nvidia-loaded-driver/bin/nvidia-smi --query-gpu=driver_version "
                           "--format=csv,noheader").strip() == old
    pinned = machine.journal("MESSAGE_ID=3f6c1a0e5d2b4e8f9a7c6d5e4b3a2918")
    assert f"driver links pinned to the loaded driver {old}" in pinned, pinned
    info = machine.succeed("nvidia-kmod-swap plan --json")
    assert '"should_pin": true' in info and f'"version": "{old}"' in info, info

    machine.succeed("systemctl stop cuda-job.service")  # the job ends; the timer swaps
    machine.wait_until_succeeds(f"test \"$(cat /sys/module/nvidia/version)\" = {new}", timeout=120)
    machine.wait_for_unit("nvidia-persistenced.service", timeout=60)
    machine.wait_until_succeeds(f"test ! -e {PIN}", timeout=30)
    assert machine.succeed("readlink /run/opengl-driver").strip() == new_env
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {new} library {new}", out
    assert machine.succeed("readlink -f /run/nvidia-loaded-driver/bin/nvidia-smi").strip() == \
        f"{bed.packages['new']['path']}/bin/nvidia-smi"
    unpinned = machine.journal("MESSAGE_ID=7a2e9c4b1d6f4a3e8b5c0d9e2f1a6b47")
    assert "driver links unpinned" in unpinned, unpinned
