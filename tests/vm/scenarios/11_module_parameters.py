"""Parameters from /etc/modprobe.d and the kernel command line survive the swap."""

BOOT = {"driver": "old", "cmdline": "nvidia-drm.modeset=1 nvidia.NVreg_EnableGpuFirmware=0",
        "files": {"/etc/modprobe.d/nvidia.conf":
                  "options nvidia NVreg_PreserveVideoMemoryAllocations=1 NVreg_TemporaryFilePath=/var/tmp\n"}}

EXPECTED = {"nvidia_drm/parameters/modeset": "Y", "nvidia/parameters/NVreg_EnableGpuFirmware": "0",
            "nvidia/parameters/NVreg_PreserveVideoMemoryAllocations": "1",
            "nvidia/parameters/NVreg_TemporaryFilePath": "/var/tmp"}


def params(machine):
    return {p: machine.succeed(f"cat /sys/module/{p}").strip() for p in EXPECTED}


def test(machine, bed):
    machine.wait_for_unit("nvidia-persistenced.service")
    assert params(machine) == EXPECTED, params(machine)  # the booted driver got them from modprobe
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    assert machine.module_version("nvidia") == bed.packages["new"]["version"]
    assert params(machine) == EXPECTED, params(machine)
