"""The new nvidia-uvm fails to load: rollback to the old modules, device nodes back, the unit fails
with a clear reason; a deploy-rs style rollback of the profile then starts it again."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old = bed.packages["old"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    bed.switch_driver("uvm-fails")
    assert bed.restart_persistenced() != 0
    bed.wait_persistenced_failed()
    assert "nvidia-uvm built to fail its init" in machine.dmesg()
    assert machine.driver_versions() == {m: old for m in ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")}, machine.driver_versions()
    users = machine.loaded_modules()
    assert {"nvidia_modeset", "nvidia_uvm", "nvidia_drm"} <= set(users["nvidia"].strip(",").split(","))
    uvm_major = int(machine.succeed("awk '$2 == \"nvidia-uvm\" {print $1}' /proc/devices"))
    machine.succeed(f"test \"$(stat -c %t:%T /dev/nvidia-uvm)\" = {uvm_major:x}:0")
    machine.succeed("test \"$(stat -c %t:%T /dev/nvidia0)\" = c3:0")
    journal = machine.journal("-u nvidia-persistenced")
    assert "rolled back: the NVIDIA driver 580.95.05 is loaded again" in journal, journal[-2000:]
    assert "nvidia-uvm.ko" in journal
    # The kernel's own words, not only errno's (issue 24): what the module's init logged meanwhile.
    assert "the kernel logged: NVRM: fake: nvidia-uvm built to fail its init" in journal, journal[-2000:]
    # deploy-rs rolls the profile back; the unit starts against the old driver, untouched.
    bed.switch_driver("old")
    machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    assert bed.restart_persistenced() == 0
    machine.wait_for_unit("nvidia-persistenced.service")
