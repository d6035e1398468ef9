"""Issue 11 §3: GSP firmware of the right version. The fake nvidia initialises a GPU (first open of
/dev/nvidia<N>) from nvidia/<its version>/gsp_ga10x.bin under firmware_class.path, and switch-driver
points that path at the new generation's firmware environment as NixOS activation does. A failed swap rolls back: the old
driver must get its own firmware path back, and its own nvidia-smi must work, before the helper
says "rolled back"."""

BOOT = {"driver": "old"}


def test(machine, bed):
    old = bed.packages["old"]
    machine.wait_for_unit("nvidia-persistenced.service")
    fw_path = "/sys/module/firmware_class/parameters/path"
    old_firmware = machine.succeed("readlink /run/booted-system/firmware").strip()
    assert machine.succeed(f"cat {fw_path}").strip() == old_firmware
    bed.switch_driver("uvm-fails")
    new_firmware = machine.succeed("readlink /run/current-system/firmware").strip()
    assert new_firmware != old_firmware and machine.succeed(f"cat {fw_path}").strip() == new_firmware
    assert bed.restart_persistenced() != 0
    bed.wait_persistenced_failed()
    assert machine.module_version("nvidia") == old["version"]
    # The kernel's firmware loader is back on the old generation's firmware ...
    assert machine.succeed(f"cat {fw_path}").strip() == old_firmware
    # ... so the rolled-back driver initialises its GPU: the old nvidia-smi opens /dev/nvidia0.
    out = machine.succeed(f"{old['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert out.strip() == old["version"], out
    kernel_log = machine.dmesg()
    assert "RmInitAdapter failed" not in kernel_log, kernel_log[-2000:]
    journal = machine.journal("-u nvidia-persistenced")
    assert f"rolled back: the NVIDIA driver {old['version']} is loaded again" in journal, journal[-2000:]
    assert f"firmware path: {new_firmware} -> {old_firmware}" in journal, journal[-2000:]
