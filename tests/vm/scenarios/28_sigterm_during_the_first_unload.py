"""Issue 22: a stop job's SIGTERM lands while the first delete_module runs (a second switch,
deploy-rs re-activating, the start timeout). The kernel has unloaded nvidia_drm; the run had not
noted it yet. The helper reads what changed from sysfs: it rolls back, nvidia_drm (the display) is
loaded again, and nothing is recorded against the driver. (On 0c4fa7d: "failed before anything
changed ... Nothing was unloaded", exit 1, nvidia_drm left unloaded.) The signal is sent by the
helper's test hook right after the kernel did step 0, as systemd's would arrive mid-syscall."""

BOOT = {"driver": "old", "persistenced": False}
MODULES = ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("multi-user.target")
    bed.switch_driver("new")
    rc, out = bed.helper("swap", env="NVIDIA_KMOD_SWAP_TERM_AFTER_STEP=0")
    assert rc == 3, f"expected a rollback (3), got {rc}: {out}"
    found = machine.driver_versions()
    assert found == {m: old for m in MODULES}, found  # nvidia_drm is back
    assert "Nothing was unloaded" not in out and "rolled back: the NVIDIA driver" in out, out
    machine.succeed("test ! -e /run/nvidia-kmod-swap/failed.json")  # a stop is not the driver's fault
    machine.succeed("test ! -e /run/nvidia-kmod-swap/swap.json")
    machine.assert_driver_nodes()
    # The next start swaps: nothing holds it back.
    rc, out = bed.helper("swap")
    assert rc == 0, out
    assert set(machine.driver_versions().values()) == {bed.packages["new"]["version"]}
