"""No driver loaded at boot (e.g. the modules were never loaded): the helper loads the profile's."""

BOOT = {"driver": None, "profile": "new"}


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    assert machine.driver_versions() == {m: new for m in ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm")}, machine.driver_versions()
    machine.succeed("test \"$(stat -c %t:%T /dev/nvidiactl)\" = c3:ff")
    out = machine.succeed(f"{bed.packages['new']['path']}/bin/nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert out.strip() == new
