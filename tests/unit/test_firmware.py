"""Issue 11 §3: GSP firmware of the right version. NixOS activation points the firmware loader at
the new generation's firmware before the units restart; the driver initialises a GPU from
nvidia/<its version>/gsp_*.bin there. A rollback must load the old driver with the old firmware
path and check it with the old driver's own nvidia-smi. Each test fails on the helper before
issue 11 (eaa63a5)."""

from __future__ import annotations

import json
import os

import pytest

from fakesys import NEW, OLD, FakeEffects, config_for, make_config, swapper, write_config, write_driver
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.quick import try_noop
from nvidia_kmod_swap.swap import EXIT_OK, EXIT_REFUSED, EXIT_ROLLBACK_FAILED, EXIT_ROLLED_BACK


def firmware(store, version):
    """nvidia_x11's firmware output: lib/firmware/nvidia/<version>/gsp_ga10x.bin."""
    top = store / f"firmware-{version}/lib/firmware"
    (top / "nvidia" / version).mkdir(parents=True)
    (top / "nvidia" / version / "gsp_ga10x.bin").write_bytes(b"GSP")
    return str(top)


def nvidia_smi(store, system, version):
    """The driver's nvidia-smi, as the fake's (tests/fake-driver/nvidia-smi.c): exit 18 on a version
    mismatch; opening a GPU initialises it, which needs GSP firmware of the loaded driver's version
    under firmware_class.path (tests/fake-driver/nvidia.c nv_init_gpu), else it finds no usable GPU."""
    path = store / f"nvidia-smi-{version}"
    sysmod = system.base / "sys/module"
    path.write_text(f"""#!/bin/sh
loaded=$(cat {sysmod}/nvidia/version 2>/dev/null)
[ "$loaded" = {version} ] || {{ echo 'Failed to initialize NVML: Driver/library version mismatch'; exit 18; }}
fw=$(cat {sysmod}/firmware_class/parameters/path)
[ -e "$fw/nvidia/$loaded/gsp_ga10x.bin" ] || {{ echo 'Unable to determine the device handle for GPU0: 0000:01:00.0: Unknown Error'; exit 255; }}
echo {version}
""")
    os.chmod(path, 0o755)
    return [str(path), "--query-gpu=driver_version", "--format=csv,noheader"]


@pytest.fixture
def bed(system, store):
    """Booted on OLD; the profile then switched to NEW, activation having moved the firmware path."""
    trees = write_driver(store, OLD), write_driver(store, NEW)
    fw = {OLD: firmware(store, OLD), NEW: firmware(store, NEW)}
    smi = {OLD: nvidia_smi(store, system, OLD), NEW: nvidia_smi(store, system, NEW)}
    system.load_driver(OLD)
    system.firmware_path = fw[OLD]
    system.sync()
    return system, store, trees, fw, smi


def boot_noop(system, tmp_path, store, trees, fw, smi):
    """At boot the unit starts with the booted generation's config: the no-op path."""
    path = write_config(tmp_path / "boot.json", make_config(store, [trees[0]], [trees[0]], driver_version=OLD,
                                                            verify_command=smi[OLD], firmware_path=fw[OLD]))
    assert try_noop(["--root", str(system.base), "--config", str(path), "check"]) == 0


def switched(system, store, trees, fw, smi, **overrides):
    system.firmware_path = fw[NEW]  # activation of the new generation
    system.sync()
    return config_for(store, trees, verify_command=smi[NEW], firmware_path=fw[NEW], **overrides)


def test_the_no_op_path_notes_the_loaded_drivers_firmware_and_verify_command(bed, tmp_path):
    system, store, trees, fw, smi = bed
    boot_noop(system, tmp_path, store, trees, fw, smi)
    record = json.loads((system.root("/run/nvidia-kmod-swap") / f"driver-{OLD}.json").read_text())
    assert record == {"format": 2, "driver_version": OLD, "firmware_path": fw[OLD], "verify_command": smi[OLD],
                      "driver_links": None, "nvidia_smi": None}


def test_a_rollback_loads_the_old_driver_with_its_own_firmware_and_checks_it(bed, tmp_path):
    system, store, trees, fw, smi = bed
    boot_noop(system, tmp_path, store, trees, fw, smi)
    config = switched(system, store, trees, fw, smi)
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config, effects).run() == EXIT_ROLLED_BACK
    assert system.versions()["nvidia"] == OLD
    assert system.firmware_path == fw[OLD], "the old driver would initialise its GPUs from the new firmware"
    # the old driver works: its own nvidia-smi says so
    assert os.system(" ".join(smi[OLD]) + " >/dev/null") == 0


def test_a_rolled_back_driver_that_does_not_work_is_not_called_rolled_back(bed, tmp_path):
    system, store, trees, fw, smi = bed
    boot_noop(system, tmp_path, store, trees, fw, smi)
    # the old generation's firmware is gone (collected): the old driver cannot initialise a GPU
    os.remove(f"{fw[OLD]}/nvidia/{OLD}/gsp_ga10x.bin")
    config = switched(system, store, trees, fw, smi)
    effects = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config, effects).run() == EXIT_ROLLBACK_FAILED


def test_a_swap_points_the_firmware_loader_at_the_new_generation_when_activation_has_not(bed, tmp_path):
    """nixos-init or a standalone run may start the unit before the path is written: the new driver
    would initialise its GPUs from the old firmware path and fail."""
    system, store, trees, fw, smi = bed
    config = parse(make_config(store, [trees[1]], [trees[0]], verify_command=smi[NEW], firmware_path=fw[NEW]))
    assert swapper(system, config).run() == EXIT_OK
    assert system.firmware_path == fw[NEW] and system.versions()["nvidia"] == NEW
    record = json.loads((system.root("/run/nvidia-kmod-swap") / f"driver-{NEW}.json").read_text())
    assert record["driver_version"] == NEW and record["firmware_path"] == fw[NEW]


def test_firmware_path_is_validated(store):
    from nvidia_kmod_swap.config import ConfigError

    with pytest.raises(ConfigError, match="firmware_path.*absolute"):
        parse(make_config(store, [store], firmware_path="lib/firmware"))


def test_crash_recovery_rolls_back_with_the_old_firmware_too(bed, tmp_path):
    """Killed after the old modules were unloaded and the new nvidia loaded: the next run (a
    restart of the unit) rolls back from swap.json, which carries the old firmware path."""
    from fakesys import Crash

    system, store, trees, fw, smi = bed
    boot_noop(system, tmp_path, store, trees, fw, smi)
    config = switched(system, store, trees, fw, smi)
    with pytest.raises(Crash):  # calls: 4 unloads, then the loads; die at the second load
        swapper(system, config, FakeEffects(system, crash_at_call=5)).run()
    assert system.versions().get("nvidia") == NEW and "nvidia_uvm" not in system.modules
    # the profile is rolled back meanwhile (deploy-rs): only the broken new uvm stays unloadable
    broken = FakeEffects(system, always_fail={("load", str(trees[1] / "misc/nvidia-uvm.ko")): 19})
    # Rolled back, then not swapped again: the interrupted swap is recorded as failed (issue 22).
    assert swapper(system, config, broken).run() == EXIT_REFUSED
    assert system.versions()["nvidia"] == OLD
    assert system.firmware_path == fw[OLD]
