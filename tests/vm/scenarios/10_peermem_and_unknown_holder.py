"""nvidia-peermem and a third-party module (gdrdrv) hold nvidia: without a new gdrdrv the swap is
refused; with one, both are unloaded first and reloaded after, built against the new nvidia."""

BOOT = {"driver": "old", "extra_packages": ["gdrdrv-old"],
        "modules": ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem", "gdrdrv"]}


def test(machine, bed):
    new = bed.packages["new"]["version"]
    machine.wait_for_unit("nvidia-persistenced.service")
    holders = set(machine.loaded_modules()["nvidia"].strip(",").split(","))
    assert {"nvidia_peermem", "gdrdrv"} <= holders, holders
    before = machine.module_addresses()
    bed.switch_driver("new")
    bed.restart_persistenced()
    bed.wait_persistenced_failed()
    assert machine.module_addresses() == before
    assert "gdrdrv is needed but no gdrdrv.ko" in machine.journal("-u nvidia-persistenced")
    machine.succeed("systemctl reset-failed nvidia-persistenced.service")
    bed.switch_driver("new", extra=("gdrdrv-new",))
    assert bed.restart_persistenced() == 0, machine.journal("-u nvidia-persistenced")
    machine.wait_for_unit("nvidia-persistenced.service")
    versions = machine.driver_versions()
    assert versions["nvidia_peermem"] == new and versions["nvidia"] == new, versions
    holders = set(machine.loaded_modules()["nvidia"].strip(",").split(","))
    assert {"nvidia_peermem", "gdrdrv"} <= holders, holders
    assert f"gdrdrv: loaded 2.4.4 against nvidia {new}" in machine.dmesg()
