"""Two bumps without a reboot: the booted system's tree holds the first driver, so the rollback for
the second swap comes from what the helper recorded; a failure there restores the swapped-in driver."""

BOOT = {"driver": "old"}


def test(machine, bed):
    newer = bed.packages["new-b"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0
    bed.switch_driver("new-b")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")[-1500:]
    assert set(machine.driver_versions().values()) == {newer}
    # The loaded driver's files have a GC root (what `nix-collect-garbage` would spare).
    root = "readlink /nix/var/nix/gcroots/nvidia-kmod-swap/nvidia"
    newer_ko = machine.succeed(f"readlink -f {bed.packages['new-b']['module_dir']}/misc/nvidia.ko").strip()
    assert machine.succeed(root).strip() == newer_ko
    # A broken third bump rolls back to new-b, whose files are in no rollback dir but the record.
    bed.switch_driver("uvm-fails")
    assert bed.restart_persistenced() != 0
    assert set(machine.driver_versions().values()) == {newer}, machine.driver_versions()
    assert "rolled back: the NVIDIA driver 580.119.02 is loaded again" in machine.journal("-u nvidia-persistenced")
    assert machine.succeed(root).strip() == newer_ko  # the roots follow what is loaded
