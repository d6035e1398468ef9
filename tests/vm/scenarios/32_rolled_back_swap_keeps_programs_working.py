"""Issue 23: a swap that fails and is rolled back leaves the old driver loaded and the deploy red;
until deploy-rs switches back (or a fixed driver comes), programs started meanwhile must get the
old driver's libraries, not the failed generation's. Then the rollback generation unpins, and a
later good driver swaps and the links follow it."""

BOOT = {"driver": "old"}
PIN = "/run/tmpfiles.d/00-nvidia-kmod-swap-pin.conf"


def test(machine, bed):
    old, newer = bed.packages["old"]["version"], bed.packages["new-b"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    booted_env = machine.succeed("readlink /run/opengl-driver").strip()

    rc, out = bed.switch("uvm-fails")
    assert rc != 0, "the swap unit's start fails: switch-to-configuration exits 4, deploy-rs rolls back"
    machine.wait_until_succeeds("journalctl -u nvidia-persistenced --grep 'rolled back: the NVIDIA driver' >/dev/null")
    assert machine.module_version("nvidia") == old and machine.module_version("nvidia_uvm") == old
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {old} library {old}", f"a program started after the rollback: {rc} {out}"
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    machine.succeed(f"test -e {PIN}")
    status = machine.succeed("nvidia-kmod-swap status")
    assert f"pinned to the loaded driver {old}" in status, status

    # deploy-rs's rollback: the old generation again; its own rule applies, nothing is pinned.
    machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    rc, out = bed.switch("old")
    assert rc == 0, out
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.succeed(f"test ! -e {PIN}")
    assert machine.succeed("readlink /run/opengl-driver").strip() == booted_env
    unpinned = machine.journal("MESSAGE_ID=7a2e9c4b1d6f4a3e8b5c0d9e2f1a6b47")
    assert "driver links unpinned" in unpinned, unpinned

    # A fixed driver later: the swap runs and the links follow it.
    rc, out = bed.switch("new-b")
    assert rc == 0, out
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.module_version("nvidia") == newer
    rc, out = bed.gpu_program()
    assert rc == 0 and out.strip() == f"driver {newer} library {newer}", out
    machine.succeed(f"test ! -e {PIN}")
    assert machine.succeed("readlink /run/opengl-driver").strip() == \
        machine.succeed("readlink /run/current-system/graphics-drivers").strip()
