"""The test bed itself: the booted driver is loaded by the kernel with its holder graph, udev made
the device nodes, and the old persistenced runs against the old module."""

BOOT = {"driver": "old"}


def test(machine, bed):
    machine.wait_for_unit("multi-user.target")
    assert machine.module_version("nvidia") == bed.packages["old"]["version"]
    users = machine.loaded_modules()
    assert set(users["nvidia"].split(",")) >= {"nvidia_modeset", "nvidia_uvm", "nvidia_drm"}, users
    assert "nvidia_drm" in users["nvidia_modeset"], users
    machine.succeed("test -c /dev/nvidiactl && test -c /dev/nvidia0 && test -c /dev/nvidia-uvm")
    # The old daemon against the old module, without the helper: the test bed's own baseline.
    bed.switch_driver("old", helper=False)
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    assert "NVRM: API mismatch" not in machine.dmesg()
