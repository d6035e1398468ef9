"""Issue 11 §5: nvidia-caps has a dynamic major and its nodes are made by nvidia-modprobe, not
udev. Another driver's major, taken before nvidia loaded and given back since, makes the new
driver's nvidia-caps major differ: after the swap no node under /dev/nvidia-caps may point at the
old one (mode and minor kept, as nvidia-modprobe's mknod_helper recreates them)."""

BOOT = {"driver": "old", "extra_packages": ["majorhog"]}


def caps_major(machine):
    return int(machine.succeed("awk '$2 == \"nvidia-caps\" {print $1}' /proc/devices"))


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    # Load the driver again behind another driver's dynamic major, as uptime does on a real host.
    machine.succeed("systemctl stop nvidia-persistenced && rmmod nvidia_drm nvidia_uvm nvidia_modeset nvidia")
    machine.succeed("modprobe majorhog && modprobe nvidia && modprobe nvidia_modeset && modprobe nvidia_uvm "
                    "&& modprobe nvidia_drm && systemctl start nvidia-persistenced")
    old_major = caps_major(machine)
    # What `nvidia-modprobe -f /proc/driver/nvidia/capabilities/mig/config` etc. do
    # (modprobe-utils/nvidia-modprobe-utils.c nvidia_cap_mknod): mkdir 0755, mknod with the
    # capability's mode and minor.
    machine.succeed(f"mkdir -m 755 /dev/nvidia-caps && mknod -m 400 /dev/nvidia-caps/nvidia-cap1 c {old_major} 1 "
                    f"&& mknod -m 444 /dev/nvidia-caps/nvidia-cap2 c {old_major} 2")
    machine.succeed("rmmod majorhog")
    bed.switch_driver("new")
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.module_version("nvidia") == new
    new_major = caps_major(machine)
    assert new_major != old_major, "the bed did not move the major: the scenario proves nothing"
    nodes = machine.succeed("stat -c '%n %F %t:%T %a' /dev/nvidia-caps/*").splitlines()
    assert nodes == [f"/dev/nvidia-caps/nvidia-cap1 character special file {new_major:x}:1 400",
                     f"/dev/nvidia-caps/nvidia-cap2 character special file {new_major:x}:2 444"], nodes
    # The node opens (the kernel routes it to the new driver's nvidia-caps).
    machine.succeed("exec 3</dev/nvidia-caps/nvidia-cap2")
    assert "nvidia-caps" in machine.journal("-u nvidia-persistenced"), "the renewed nodes are not in the journal"
