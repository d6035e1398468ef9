"""Wrong vermagic, wrong version, a corrupt file, a missing nvidia-uvm.ko: refused before anything
is unloaded; the old driver still serves."""

BOOT = {"driver": "old"}

CASES = {
    "wrong-kernel": "built for kernel '6.1.0-99-amd64'",
    "wrong-version": "version '580.119.02'",
    "corrupt": "cannot use",
    "no-uvm": "no nvidia-uvm.ko",
}


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    before = machine.module_addresses()
    for label, reason in CASES.items():
        bed.switch_driver(label)
        bed.restart_persistenced()
        bed.wait_persistenced_failed()
        assert machine.module_addresses() == before, f"{label}: modules were reloaded"
        assert set(machine.driver_versions().values()) == {old}
        journal = machine.journal("-u nvidia-persistenced")
        assert reason in journal, f"{label}: {journal[-1500:]}"
        # The old driver still serves its own userspace.
        out = machine.succeed(f"{bed.packages['old']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
        assert out.strip() == old
        machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    # The wrong-kernel module really is one the kernel refuses (the fake is faithful).
    path = bed.packages["wrong-kernel"]["module_dir"] + "/misc/nvidia-peermem.ko"
    out = machine.fail(f"insmod {path}")
    assert "Invalid module format" in out, out
