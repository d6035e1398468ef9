"""The planner's outcomes, from real module files and a fake /proc + /sys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fakesys import NEW, OLD, RELEASE, write_driver, write_ko
from nvidia_kmod_swap.config import parse
from nvidia_kmod_swap.facts import make_plan
from nvidia_kmod_swap.plan import unload_order


def plan_for(system, store, new_dir, old_dir=None, **overrides):
    config = {"driver_version": NEW, "kernel_release": RELEASE, "module_dirs": [str(new_dir)],
              "rollback_dirs": [str(old_dir)] if old_dir else [], "allowed_prefixes": [str(store) + "/"]}
    config.update(overrides)
    return make_plan(system.root, parse(config))


@pytest.fixture
def trees(store):
    return write_driver(store, OLD), write_driver(store, NEW)


def test_versions_equal_is_none(system, store, trees):
    system.load_driver(NEW)
    plan = plan_for(system, store, trees[1], trees[0])
    assert plan.action == "none"
    assert plan.unload == () and plan.load == ()


def test_versions_equal_with_pending_kernel_is_still_none(system, store, trees):
    system.load_driver(NEW)
    plan = plan_for(system, store, trees[1], trees[0], kernel_release="6.1.0-99-amd64")
    assert plan.action == "none"
    assert "6.1.0-99-amd64 is waiting for a reboot" in plan.reason


def test_nothing_loaded_loads_in_dependency_order(system, store, trees):
    plan = plan_for(system, store, trees[1])
    assert plan.action == "load"
    names = [s.name for s in plan.load]
    assert names[0] == "nvidia"
    assert names.index("nvidia_modeset") < names.index("nvidia_drm")
    assert set(names) == {"nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"}
    assert all(Path(s.path).is_relative_to(trees[1]) for s in plan.load)


def test_swap_unloads_users_first_and_finds_rollback_files(system, store, trees):
    old_dir, new_dir = trees
    system.load_driver(OLD)
    plan = plan_for(system, store, new_dir, old_dir)
    assert plan.action == "swap", plan.reason
    assert plan.unload == ("nvidia_drm", "nvidia_uvm", "nvidia_modeset", "nvidia")
    assert [s.name for s in plan.load] == ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    assert all(Path(s.path).is_relative_to(new_dir) for s in plan.load)
    assert [s.name for s in plan.rollback] == ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    assert all(Path(s.path).is_relative_to(old_dir) for s in plan.rollback)
    assert plan.loaded_version == OLD and plan.expected_version == NEW


def test_downgrade_is_a_swap_too(system, store, trees):
    """deploy-rs's auto-rollback re-activates the old generation: the loaded new driver must go."""
    system.load_driver(NEW)
    plan = plan_for(system, store, trees[0], trees[1], driver_version=OLD)
    assert plan.action == "swap"


def test_half_swapped_state_is_swapped(system, store, trees):
    system.load_driver(NEW)
    system.change("nvidia_uvm", version=OLD, srcversion=f"SRCnvidia_uvm{OLD}".upper()[:23])
    assert plan_for(system, store, trees[1], trees[0]).action == "swap"


def test_peermem_holder_is_unloaded_first_and_reloaded(system, store, trees):
    system.load_driver(OLD, names=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem"))
    plan = plan_for(system, store, trees[1], trees[0])
    assert plan.action == "swap"
    assert plan.unload.index("nvidia_peermem") < plan.unload.index("nvidia")
    assert "nvidia_peermem" in [s.name for s in plan.load]


def test_unknown_holder_is_reloaded_from_extra_dir(system, store, trees):
    gdr_old = store / "gdr-old/lib/modules" / RELEASE
    gdr_new = store / "gdr-new/lib/modules" / RELEASE
    write_ko(gdr_old / "extra", "gdrdrv", "2.4.4", depends=("nvidia",))
    write_ko(gdr_new / "extra", "gdrdrv", "2.4.4", depends=("nvidia",))
    system.load_driver(OLD)
    system.add("gdrdrv", "2.4.4", ("nvidia",), srcversion="SRCGDRDRV2.4.4")
    config = dict(module_dirs=[str(trees[1]), str(gdr_new)], rollback_dirs=[str(trees[0]), str(gdr_old)])
    plan = plan_for(system, store, trees[1], **config)
    assert plan.action == "swap", plan.reason
    assert plan.unload[0] == "gdrdrv" or plan.unload.index("gdrdrv") < plan.unload.index("nvidia")
    assert [s.name for s in plan.load][-1] in ("gdrdrv", "nvidia_drm")
    assert "gdrdrv" in [s.name for s in plan.load]


def test_unknown_holder_without_new_build_is_refused(system, store, trees):
    gdr_old = store / "gdr-old/lib/modules" / RELEASE
    write_ko(gdr_old / "extra", "gdrdrv", "2.4.4", depends=("nvidia",))
    system.load_driver(OLD)
    system.add("gdrdrv", "2.4.4", ("nvidia",))
    plan = plan_for(system, store, trees[1], rollback_dirs=[str(trees[0]), str(gdr_old)])
    assert plan.action == "refuse"
    assert "gdrdrv is needed but no gdrdrv.ko" in plan.reason


def test_kernel_change_defers_or_refuses(system, store, trees):
    system.load_driver(OLD)
    plan = plan_for(system, store, trees[1], trees[0], kernel_release="6.1.0-99-amd64")
    assert plan.action == "defer"
    assert "reboot is required" in plan.reason and "6.1.0-99-amd64" in plan.reason
    plan = plan_for(system, store, trees[1], trees[0], kernel_release="6.1.0-99-amd64", on_kernel_change="fail")
    assert plan.action == "refuse"


def test_nothing_loaded_and_kernel_changed_defers(system, store, trees):
    plan = plan_for(system, store, trees[1], kernel_release="6.1.0-99-amd64")
    assert plan.action == "defer"


@pytest.mark.parametrize("breakage, expect", [
    ("wrong-kernel", "built for kernel '6.1.0-99-amd64'"),
    ("wrong-version", "version '570.144.01'"),
    ("corrupt", "cannot use"),
    ("missing-uvm", "nvidia_uvm is needed but no nvidia-uvm.ko"),
    ("not-elf", "not an ELF file"),
])
def test_bad_new_module_is_refused_before_anything(system, store, trees, breakage, expect):
    old_dir, _ = trees
    bad = write_driver(store / "bad", NEW)
    uvm = bad / "misc/nvidia-uvm.ko"
    if breakage == "wrong-kernel":
        write_ko(bad / "misc", "nvidia_uvm", NEW, release="6.1.0-99-amd64")
    elif breakage == "wrong-version":
        write_ko(bad / "misc", "nvidia_uvm", "570.144.01")
    elif breakage == "corrupt":
        uvm.write_bytes(uvm.read_bytes()[:200])
    elif breakage == "missing-uvm":
        uvm.unlink()
    elif breakage == "not-elf":
        uvm.write_text("hello")
    system.load_driver(OLD)
    plan = plan_for(system, store, bad, old_dir, allowed_prefixes=[str(store) + "/"])
    assert plan.action == "refuse"
    assert expect in plan.reason, plan.reason
    assert "Nothing was unloaded" in plan.reason
    assert plan.unload == () and plan.load == ()


def test_symlink_out_of_allowed_prefix_is_refused(system, store, trees, tmp_path):
    outside = write_driver(tmp_path / "elsewhere", NEW)
    linked = store / "linked/lib/modules" / RELEASE / "misc"
    linked.mkdir(parents=True)
    for ko in (outside / "misc").iterdir():
        (linked / ko.name).symlink_to(ko)
    system.load_driver(OLD)
    plan = plan_for(system, store, linked.parent, trees[0])
    assert plan.action == "refuse"
    assert "outside the allowed prefixes" in plan.reason


def test_missing_rollback_files_refuse(system, store, trees):
    system.load_driver(OLD)
    plan = plan_for(system, store, trees[1])
    assert plan.action == "refuse"
    assert "rollback" in plan.reason and "a failed swap could not be undone" in plan.reason


def test_rollback_matches_srcversion_not_just_version(system, store, trees):
    """Two builds of the same version: only the one that is loaded is a faithful rollback."""
    system.load_driver(OLD)
    system.change("nvidia", srcversion="SOMETHINGELSE")
    plan = plan_for(system, store, trees[1], trees[0])
    assert plan.action == "refuse" and "nvidia '570.124.04' srcversion SOMETHINGELSE" in plan.reason


@pytest.mark.parametrize("policy, action", [("defer", "defer"), ("fail", "refuse")])
def test_busy_gpu(system, store, trees, policy, action):
    system.load_driver(OLD)
    system.hold_device(4242, "cuda-job", "cuda-job.service")
    plan = plan_for(system, store, trees[1], trees[0], on_busy=policy)
    assert plan.action == action
    assert "pid 4242 (cuda-job) holds /dev/nvidia0 [cuda-job.service]" in plan.reason
    assert plan.holders[0].unit == "cuda-job.service"


def test_busy_gpu_stop_units(system, store, trees):
    system.load_driver(OLD)
    system.hold_device(4242, "cuda-job", "cuda-job.service")
    plan = plan_for(system, store, trees[1], trees[0], on_busy="stop-units", stop_units=["cuda-job.service"])
    assert plan.action == "swap" and plan.stop_units == ("cuda-job.service",)
    plan = plan_for(system, store, trees[1], trees[0], on_busy="stop-units", stop_units=["other.service"])
    assert plan.action == "defer" and "cuda-job.service not in stop_units" in plan.reason


def test_kernel_user_without_process_defers(system, store, trees):
    system.load_driver(OLD)
    system.change("nvidia_drm", refcnt_extra=1)  # e.g. fbcon on nvidia-drm
    plan = plan_for(system, store, trees[1], trees[0])
    assert plan.action == "defer"
    assert "nvidia_drm has 1 reference(s) from the kernel, not from a process" in plan.reason
    assert "nvidia_drm.fbdev=0" in plan.reason  # something the user can act on


def test_module_parameters_reach_the_load_steps(system, store, trees):
    (system.base / "etc/modprobe.d/nvidia.conf").write_text("options nvidia NVreg_PreserveVideoMemoryAllocations=1\n")
    (system.base / "proc/cmdline").write_text("quiet nvidia-drm.modeset=1 nvidia.NVreg_EnableGpuFirmware=0\n")
    system.load_driver(OLD)
    plan = plan_for(system, store, trees[1], trees[0])
    params = {s.name: s.params for s in plan.load}
    assert params["nvidia"] == "NVreg_PreserveVideoMemoryAllocations=1 NVreg_EnableGpuFirmware=0"
    assert params["nvidia_drm"] == "modeset=1"
    assert {s.name: s.params for s in plan.rollback} == params


def test_open_layout_and_compressed_modules(system, store):
    system.load_driver(OLD)
    old_dir = write_driver(store, OLD)
    for layout, compression in (("open", ""), ("misc", "xz"), ("misc", "zst")):
        new_dir = write_driver(store / f"{layout}{compression}", NEW, layout=layout, compression=compression)
        plan = plan_for(system, store, new_dir, old_dir)
        assert plan.action == "swap", (layout, compression, plan.reason)
        suffix = {"": ".ko", "xz": ".ko.xz", "zst": ".ko.zst"}[compression]
        assert all(s.path.endswith(suffix) for s in plan.load)


def test_orders_are_topological(system):
    system.load_driver(OLD, names=("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem"))
    from nvidia_kmod_swap.snapshot import read_snapshot
    snap = read_snapshot(system.root)
    order = unload_order(snap, snap.family())
    for name in order:
        for holder in snap.modules[name].holders:
            assert order.index(holder) < order.index(name)
    assert order[-1] == "nvidia"


def test_plan_json_has_the_contract_keys(system, store, trees):
    system.load_driver(OLD)
    data = plan_for(system, store, trees[1], trees[0]).to_json()
    assert {"action", "reason", "unload", "load"} <= set(data)
    assert {"name", "path", "params", "version", "srcversion", "depends"} == set(data["load"][0])



def nixos_module_tree(top: Path, driver_dir: Path, in_tree: int = 300) -> Path:
    """A system.modulesTree as NixOS builds it (nixos/modules/system/boot/kernel.nix: `[ kernel ] ++
    boot.extraModulePackages`, merged by aggregateModules): the kernel's own xz-compressed modules
    beside symlinks to the driver's files, all in one lib/modules/<release>."""
    tree = top / "lib/modules" / RELEASE
    write_ko(tree / "kernel/drivers/gpu/drm", "drm", None, depends=(), compression="xz")
    write_ko(tree / "kernel/drivers/gpu/drm", "drm_kms_helper", None, depends=("drm",), compression="xz")
    for i in range(in_tree):
        write_ko(tree / f"kernel/drivers/misc{i % 20}", f"intree{i}", None, depends=("drm",), compression="xz")
    video = tree / "kernel/drivers/video"
    video.mkdir(parents=True, exist_ok=True)
    for ko in sorted(driver_dir.rglob("*.ko")):
        (video / ko.name).symlink_to(ko)
    return tree


def driver_using_drm(store: Path, version: str) -> Path:
    """The driver's modules as nvidia_x11.mod builds them, with nvidia-drm using the kernel's DRM."""
    directory = store / f"{version}-nvidia-kernel-modules/lib/modules/{RELEASE}/kernel/drivers/video"
    for name in ("nvidia", "nvidia_modeset", "nvidia_uvm"):
        write_ko(directory, name, version)
    write_ko(directory, "nvidia_drm", version, depends=("nvidia_modeset", "nvidia", "drm_kms_helper", "drm"))
    return directory


@pytest.fixture
def parsed(monkeypatch):
    """Names of the module files the planner opened and parsed."""
    from nvidia_kmod_swap import facts

    seen: list[str] = []
    real = facts.read_modinfo

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(facts, "read_modinfo", counting)
    return seen


def test_whole_module_tree_parses_only_the_files_it_needs(system, store, parsed):
    """module_dirs and rollback_dirs are whole module trees: only the driver's files are read, not
    the thousands of in-tree modules beside them; loaded kernel modules (drm) are left alone."""
    old_tree = nixos_module_tree(store / "booted-kernel-modules", driver_using_drm(store, OLD))
    new_tree = nixos_module_tree(store / "next-kernel-modules", driver_using_drm(store, NEW))
    system.add("drm", None, uses=())
    system.add("drm_kms_helper", None, uses=("drm",))
    for name in ("nvidia", "nvidia_modeset", "nvidia_uvm"):
        system.add(name, OLD)
    system.add("nvidia_drm", OLD, uses=("nvidia_modeset", "nvidia", "drm_kms_helper", "drm"))
    plan = plan_for(system, store, new_tree, old_tree)
    assert plan.action == "swap", plan.reason
    assert [s.name for s in plan.load] == ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    assert all("/kernel/drivers/video/" in s.path for s in plan.load + plan.rollback)
    assert plan.prerequisites == ()
    assert "drm" not in plan.unload and "drm_kms_helper" not in plan.unload
    assert not [name for name in parsed if name.startswith("intree")], "parsed in-tree modules it does not need"
    assert len(parsed) <= 16, parsed  # 4 + 2 kernel deps new, 4 + 4 old (booted tree and new tree)


def test_kernel_dependency_in_the_tree_is_loaded_by_name_not_from_the_tree(system, store):
    """A dependency the tree has but that is not the driver's (drm, not loaded yet) is a
    prerequisite the running kernel loads by name, never a file from the new tree."""
    tree = nixos_module_tree(store / "kernel-modules", driver_using_drm(store, NEW), in_tree=5)
    plan = plan_for(system, store, tree, modules=["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"])
    assert plan.action == "load", plan.reason
    assert [s.name for s in plan.load] == ["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm"]
    assert plan.prerequisites == ("drm", "drm_kms_helper")


def test_softdep_post_modules_are_loaded_as_modprobe_would(system, store, trees):
    """nixpkgs' nvidia.nix loads nvidia_uvm through `softdep nvidia post: nvidia_uvm` (modprobe.d),
    not boot.kernelModules; finit_module ignores softdeps, so the plan must add it itself."""
    (system.base / "etc/modprobe.d/nvidia-uvm.conf").write_text("softdep nvidia post: nvidia_uvm\n")
    plan = plan_for(system, store, trees[1], modules=["nvidia", "nvidia_modeset"])
    assert plan.action == "load", plan.reason
    assert [s.name for s in plan.load] == ["nvidia", "nvidia_modeset", "nvidia_uvm"]


def test_softdep_the_new_driver_lacks_is_skipped_not_refused(system, store):
    """Soft dependencies are optional (modprobe.d(5)): a tree without nvidia_uvm still loads."""
    tree = write_driver(store, NEW, modules=("nvidia", "nvidia_modeset"))
    (system.base / "etc/modprobe.d/nvidia.conf").write_text("softdep nvidia pre: ecdh_generic post: nvidia-uvm\n")
    plan = plan_for(system, store, tree, modules=["nvidia", "nvidia_modeset"])
    assert plan.action == "load", plan.reason
    assert [s.name for s in plan.load] == ["nvidia", "nvidia_modeset"]


def test_softdep_parsing():
    from nvidia_kmod_swap.params import parse_softdeps

    text = "# comment\nsoftdep nvidia post: nvidia_uvm\nsoftdep nvidia-drm pre: \\\n  drm post: x\nblacklist nouveau\n"
    assert parse_softdeps(text) == [("nvidia", ["nvidia_uvm"]), ("nvidia_drm", ["drm", "x"])]


def test_direction_follows_version_order_not_string_order():
    from nvidia_kmod_swap.plan import direction

    assert direction("570.86.16", "570.133.07") == "upgrade"  # as strings, "570.86" > "570.133"
    assert direction("570.133.07", "570.86.16") == "downgrade"
    assert direction(None, "570.133.07") == "install"
    with pytest.raises(ValueError, match="'latest' is not a version number"):
        direction("570.86.16", "latest")


def test_a_rollback_generation_is_planned_as_a_downgrade(system, store, trees):
    system.load_driver(NEW)
    plan = plan_for(system, store, trees[0], trees[1], driver_version=OLD)
    assert plan.direction == "downgrade" and plan.reason.startswith("downgrade NVIDIA driver 570.133.07 -> 570.124.04")


def test_a_malformed_version_is_refused_with_a_clear_message(system, store, trees):
    system.load_driver(OLD)
    system.change("nvidia", version="570.124.04-custom")
    plan = plan_for(system, store, trees[1], trees[0])
    assert plan.action == "refuse" and "'570.124.04-custom' is not a version number" in plan.reason


def test_a_refusal_names_the_tree_once(system, store, trees):
    """Issue 24: a store path of 120 characters once, not once per module."""
    old_dir, _ = trees
    bad = write_driver(store / "bad", NEW, release="6.1.0-99-amd64")
    system.load_driver(OLD)
    plan = plan_for(system, store, bad, old_dir, allowed_prefixes=[str(store) + "/"])
    assert plan.action == "refuse"
    assert plan.reason.count(str(bad)) == 1, plan.reason
    assert (f"in {bad / 'misc'}: nvidia.ko, nvidia-drm.ko, nvidia-modeset.ko, nvidia-uvm.ko were built for kernel "
            "'6.1.0-99-amd64'") in plan.reason, plan.reason


def test_a_peermem_without_infiniband_is_refused_up_front(system, store, trees):
    """Issue 24: Debian's 550 nvidia-peermem, built without MLNX_OFED's peer-memory symbols, depends
    on nothing and fails its init with EINVAL: asked for, it is refused before anything changes,
    instead of failing (and rolling back) every swap."""
    old_dir, _ = trees
    new = write_driver(store / "ib", NEW)
    write_ko(new / "misc", "nvidia_peermem", NEW, depends=())
    system.load_driver(OLD)
    plan = plan_for(system, store, new, old_dir, allowed_prefixes=[str(store) + "/"],
                    modules=["nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm", "nvidia_peermem"])
    assert plan.action == "refuse" and plan.unload == ()
    assert "nvidia-peermem.ko was built without InfiniBand peer-memory support" in plan.reason, plan.reason
    # Not asked for: the file is there, nothing loads it, the swap goes on.
    assert plan_for(system, store, new, old_dir, allowed_prefixes=[str(store) + "/"]).action == "swap"
