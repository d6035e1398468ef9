"""Issue 21: NixOS as it really is. After a live swap, loads by name must get the loaded driver's
files, not the booted generation's (NixOS's kmod searches /run/booted-system/kernel-modules first);
and a garbage collection of the generation that swapped must not take the next swap's rollback
source (module files, firmware, verify command) with it. Each test fails on 0c4fa7d."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fakesys import (
    NEW,
    OLD,
    FakeEffects,
    config_for,
    make_config,
    swapper,
    write_driver,
)
from nvidia_kmod_swap.byname import BY_NAME_RULES, install_lines
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.facts import make_plan
from nvidia_kmod_swap.modinfo import ModInfo, ModuleFiles, read_modinfo
from nvidia_kmod_swap.plan import SWAP
from nvidia_kmod_swap.swap import EXIT_OK

NEWER = "580.119.02"


@pytest.fixture
def trees(store):
    return write_driver(store, OLD), write_driver(store, NEW)


def modprobe(system, effects, name: str, booted: list[Path]) -> None:
    """`modprobe NAME` as kmod does it (libkmod-module.c kmod_module_probe_insert_module): nothing
    if loaded; else the first `install NAME` line in file-name order runs (here: its `modprobe -a
    DEPS` and `insmod FILE`), or the file of the first module directory that has one is loaded
    after its dependencies."""
    if name in system.modules:
        return
    for conf in sorted(system.modprobe_confs(), key=lambda p: p.name):
        for line in conf.read_text().splitlines():
            words = line.split()
            if words[:2] != ["install", name]:
                continue
            for command in " ".join(words[2:]).split(" && "):
                argv = command.split()
                if argv[0].endswith("/modprobe"):
                    for dep in argv[2:]:
                        modprobe(system, effects, dep, booted)
                elif argv[0].endswith("/insmod"):
                    effects.load(argv[1], "")
                elif argv[0] == "false":
                    raise RuntimeError(f"install {name} false")
            return
    path = ModuleFiles([str(d) for d in booted]).get(name)[0]
    for dep in read_modinfo(path).depends:
        modprobe(system, effects, dep, booted)
    effects.load(str(path), "")


def test_a_load_by_name_after_the_swap_gets_the_loaded_drivers_file(system, store, trees):
    """nvidia_peermem (shipped by the new driver, not loaded) and nvidia_uvm (unloaded by an admin
    after the swap) loaded by name come from the new driver, as the journal's swap claimed."""
    system.load_driver(OLD, names=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"))
    effects = FakeEffects(system)
    assert swapper(system, config_for(store, trees), effects).run() == EXIT_OK
    effects.unload("nvidia_uvm")
    modprobe(system, effects, "nvidia_uvm", [trees[0]])
    modprobe(system, effects, "nvidia_peermem", [trees[0]])
    assert system.versions()["nvidia_uvm"] == NEW
    assert system.versions()["nvidia_peermem"] == NEW
    rules = (system.base / BY_NAME_RULES.lstrip("/")).read_text()
    assert f"insmod {trees[1]}/misc/nvidia-peermem.ko $CMDLINE_OPTS" in rules, rules
    assert "install nvidia_uvm " in rules and " -a nvidia && " in rules, rules


def test_back_on_the_booted_driver_nothing_is_routed(system, store, trees):
    system.load_driver(OLD)
    assert swapper(system, config_for(store, trees), FakeEffects(system)).run() == EXIT_OK
    assert (system.base / BY_NAME_RULES.lstrip("/")).exists()
    back = parse(make_config(store, [trees[0]], [trees[0]], driver_version=OLD))
    assert swapper(system, back, FakeEffects(system)).run() == EXIT_OK
    assert system.versions()["nvidia"] == OLD
    assert not (system.base / BY_NAME_RULES.lstrip("/")).exists()


def test_a_rollback_routes_to_the_driver_it_restored(system, store, trees):
    """Swapped to NEW, then a failing bump to NEWER rolls back to NEW: by-name loads get NEW's files."""
    system.load_driver(OLD)
    assert swapper(system, config_for(store, trees), FakeEffects(system)).run() == EXIT_OK
    newer = write_driver(store, NEWER)
    config = parse(make_config(store, [newer], [trees[0]], driver_version=NEWER))
    failing = FakeEffects(system, always_fail={("load", str(newer / "misc/nvidia-uvm.ko")): 19})
    assert swapper(system, config, failing).run() != EXIT_OK
    assert system.versions()["nvidia"] == NEW
    rules = (system.base / BY_NAME_RULES.lstrip("/")).read_text()
    assert str(trees[1]) in rules and str(newer) not in rules, rules


def test_install_lines_leave_out_the_booted_file_and_unsafe_paths():
    def info(name, path, depends=()):
        return ModInfo(Path(path), name, NEW, "6.1.0 SMP", tuple(depends), None)

    lines = install_lines([info("nvidia", "/nix/store/a-new/nvidia.ko", ["drm"]),
                           info("nvidia_uvm", "/nix/store/a-old/nvidia-uvm.ko", ["nvidia"]),
                           info("nvidia_drm", "/nix/store/a new/nvidia-drm.ko")],
                          {"nvidia_uvm": "/nix/store/a-old/nvidia-uvm.ko"}, "/sbin/modprobe", "/sbin/insmod")
    assert lines == ["install nvidia /sbin/modprobe -a drm && /sbin/insmod /nix/store/a-new/nvidia.ko $CMDLINE_OPTS"]


def generation(store: Path, name: str, tree: Path) -> Path:
    """A generation's module tree as aggregateModules builds it: a buildEnv of links to the files."""
    top = store / f"00000000-{name}-kernel-modules" / "lib/modules" / tree.name
    for file in tree.rglob("*.ko*"):
        link = top / file.relative_to(tree)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    return top


def test_a_gc_of_the_generation_that_swapped_keeps_the_next_bumps_rollback_source(system, store, trees, tmp_path):
    """The loaded record names the files themselves: with the swapping generation's tree collected,
    the next bump is still a swap (on 0c4fa7d: refused, "no file of the loaded module(s)")."""
    system.load_driver(OLD)
    gen1 = generation(store, "gen1", trees[1])
    firmware = store / "00000001-firmware" / "lib/firmware"
    (firmware / f"nvidia/{NEW}").mkdir(parents=True)
    system.firmware_path = str(firmware)
    system.sync()
    smi = store / "00000002-nvidia-x11-bin/bin/nvidia-smi"
    smi.parent.mkdir(parents=True)
    smi.write_text("#!/bin/sh\necho " + NEW + "\n")
    smi.chmod(0o755)
    config = parse(make_config(store, [gen1], [trees[0]], gc_root_dir="/nix/var/nix/gcroots/nvidia-kmod-swap",
                               verify_command=[str(smi)], firmware_path=str(firmware)))
    assert swapper(system, config, FakeEffects(system)).run() == EXIT_OK
    record = json.loads((system.base / "run/nvidia-kmod-swap/loaded.json").read_text())
    assert all(m["path"].startswith(str(trees[1])) for m in record["modules"]), record
    roots = system.base / "nix/var/nix/gcroots/nvidia-kmod-swap"
    assert os.readlink(roots / "firmware") == str(firmware)
    assert os.readlink(roots / "verify-command") == str(smi)
    shutil.rmtree(gen1.parents[2])  # nix-collect-garbage: gen1 is neither current nor booted
    newer = write_driver(store, NEWER)
    plan = make_plan(system.root, parse(make_config(store, [newer], [trees[0]], driver_version=NEWER)))
    assert plan.action == SWAP, plan.reason
