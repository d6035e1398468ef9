"""Issue 11 §2: DRM clients. With nvidia_drm.modeset=1 the fake nvidia-drm registers a real DRM
device (/dev/dri/card0, its device bound to an NVIDIA module, as the real one on the GPU's PCI
device). A display manager holding /dev/dri/card0 pins nvidia_drm without any /dev/nvidia* open.
Deferred, the journal names it by pid and unit (not "kernel users"); with on_busy=stop-units it is
stopped for the swap and started again, on the new driver's DRM device."""

BOOT = {"driver": "old", "cmdline": "nvidia_drm.modeset=1"}

UNIT = """[Unit]
Description=A display manager (holds the NVIDIA DRM node)

[Service]
ExecStart=/bin/bash -c 'exec 3<>/dev/dri/card0; exec sleep infinity'
"""


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    machine.succeed("test -c /dev/dri/card0")
    assert machine.succeed("basename $(readlink /sys/class/drm/card0/device/driver/module)").strip() == "nvidia_drm"
    machine.succeed("cat > /run/systemd/system/display-manager.service <<'EOF'\n" + UNIT + "EOF\n"
                    "systemctl daemon-reload && systemctl start display-manager.service")
    pid = bed.wait_holding("display-manager.service", "/dev/dri/card0")
    machine.fail(f"ls -l /proc/{pid}/fd | grep -q /dev/nvidia")  # no /dev/nvidia* at all
    assert int(machine.succeed("cat /sys/module/nvidia_drm/refcnt")) >= 1

    # Deferred: the holder is named, with its unit.
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0
    assert bed.unit_state() == "inactive"
    journal = machine.journal("-u nvidia-persistenced")
    assert f"pid {pid} (sleep) holds /dev/dri/card0 [display-manager.service]" in journal, journal[-2000:]

    # stop-units: stopped, swapped, started again on the new DRM device.
    bed.switch_driver("new", config={"on_busy": "stop-units", "stop_units": ["display-manager.service"]})
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    versions = machine.driver_versions()
    assert all(versions[m] == new for m in ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")), versions
    assert machine.succeed("cat /sys/module/nvidia_drm/parameters/modeset").strip() == "Y"
    machine.wait_for_unit("display-manager.service")
    new_pid = bed.wait_holding("display-manager.service", "/dev/dri/card0")
    assert new_pid != pid
    assert f"nvidia-drm: loaded {new} against nvidia {new} (modeset=1: DRM device registered)" in machine.dmesg()
