# Shared by every story (prepended to its script). switch() runs switch-to-configuration of the
# booted system or one of its specialisations, as a deploy or a deploy-rs roll-back does.
MODULES = ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]


def versions():
    """What the kernel says is loaded: /sys/module/<m>/version."""
    return {m: machine.succeed(f"cat /sys/module/{m}/version").strip() for m in MODULES}


def switch(generation):
    path = "/run/booted-system" + ("" if generation == "base" else f"/specialisation/{generation}")
    return machine.execute(f"{path}/bin/switch-to-configuration test")


def unit_state(unit):
    return machine.succeed(f"systemctl show -P ActiveState {unit}").strip()


machine.wait_for_unit("nvidia-persistenced.service")
assert set(versions().values()) == {OLD}, versions()
