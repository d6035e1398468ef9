"""Issue 21, item 6: a garbage collection of the generation that swapped keeps everything a
rollback to the loaded driver needs. Each switch here builds a generation as NixOS does (its module
tree a buildEnv of links, its firmware environment another), and the bed's nix-collect-garbage
deletes what no root reaches. On 0c4fa7d the next bump after the collection is refused ("no file
of the loaded module(s) ... was found") and the unit fails."""

BOOT = {"driver": "old"}


def collect_garbage(machine, keep=()):
    """The bed's GC. KEEP: packages a later generation of this scenario installs (a real store would
    build or substitute them again; the bed cannot)."""
    for label, path in keep:
        machine.succeed(f"ln -sfn {path} /nix/var/nix/gcroots/testbed-{label}")
    return machine.succeed("nix-collect-garbage")


def test(machine, bed):
    newer = bed.packages["new-b"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    swapped_tree = machine.succeed("readlink -f /run/current-system/kernel-modules").strip()
    bed.switch_driver("new-b")
    deleted = collect_garbage(machine, keep=[("uvm-fails", bed.packages["uvm-fails"]["path"])])
    assert swapped_tree in deleted, deleted  # the generation that swapped is gone
    machine.fail(f"test -e {swapped_tree}")
    machine.succeed(f"test -e {bed.packages['new']['path']}")  # the loaded driver's files are not
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")[-2000:]
    assert set(machine.driver_versions().values()) == {newer}, machine.driver_versions()
    # A failing bump after the collection of new-b's generation rolls back to new-b, whose firmware
    # environment and nvidia-smi only the helper's GC roots keep now.
    newer_firmware = machine.succeed("readlink -f /run/current-system/firmware").strip()
    bed.switch_driver("uvm-fails")
    deleted = collect_garbage(machine)
    machine.succeed(f"test -e {newer_firmware}/nvidia/{newer}/gsp_ga10x.bin")
    assert bed.restart_persistenced() != 0
    assert set(machine.driver_versions().values()) == {newer}, machine.driver_versions()
    journal = machine.journal("-u nvidia-persistenced")
    assert f"rolled back: the NVIDIA driver {newer} is loaded again" in journal, journal[-2000:]
    smi = f"{bed.packages['new-b']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader"
    assert machine.succeed(smi).strip() == newer
