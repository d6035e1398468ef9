# Shared by every story (prepended to its script). switch() runs switch-to-configuration of the
# booted system or one of its specialisations, as a deploy or a deploy-rs roll-back does.
MODULES = ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]


def versions():
    """What the kernel says is loaded: /sys/module/<m>/version."""
    return {m: machine.succeed(f"cat /sys/module/{m}/version").strip() for m in MODULES}


def switch(generation):
    path = "/run/booted-system" + ("" if generation == "base" else f"/specialisation/{generation}")
    return machine.execute(f"{path}/bin/switch-to-configuration test")


def switch_while_busy(generation):
    """cuda-job.service holds /dev/nvidia0, then the switch: the swap must be deferred."""
    machine.succeed("systemctl start cuda-job.service")
    machine.wait_until_succeeds(
        "ls -l /proc/$(systemctl show -P MainPID cuda-job.service)/fd | grep /dev/nvidia0 >/dev/null"
    )
    return switch(generation)


def unit_state(unit):
    return machine.succeed(f"systemctl show -P ActiveState {unit}").strip()


machine.wait_for_unit("nvidia-persistenced.service")
assert set(versions().values()) == {OLD}, versions()
